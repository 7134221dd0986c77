#!/bin/bash
# distopt.train on a Cloud TPU VM (TPUStrategy through TPUClusterResolver).
#
# On a single-host TPU VM (v2-8, v3-8, v4-8, v5e-8 ...), from the repository:
#   bash launch/tpu_vm.sh                          # LeNet, configs/lenet_mnist.cfg
#   bash launch/tpu_vm.sh --model=mlp --epochs=10  # extra flags override
#
# From a workstation, on every host of a TPU VM (pod slices run the same
# program on each host):
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
#     --command="cd distopt && MODEL_DIR=gs://BUCKET/runs/lenet bash launch/tpu_vm.sh"
#
# MODEL_DIR should be a gs:// bucket the TPU VM's service account can write.
# A local path works on a single host. Needs TensorFlow built for TPU
# (`pip install tensorflow-tpu -f https://storage.googleapis.com/libtpu-tf-releases/index.html`).
# TPUs need static shapes: the trainer always drops the last partial training
# batch there and pads evaluation batches (masked, so metrics stay exact).

set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TPU="${TPU:-local}"           # "local" on a TPU VM; a TPU name from elsewhere.
MODEL_DIR="${MODEL_DIR:-runs/tpu_lenet}"

# bfloat16 is the TPU's native matmul type; a larger global batch (divisible
# by the number of TPU cores) and many steps per host loop keep it busy.
"${PYTHON}" -m distopt.train \
  --flagfile=configs/lenet_mnist.cfg \
  --strategy=tpu \
  --tpu="${TPU}" \
  --mixed_precision=bfloat16 \
  --batch_size=1024 \
  --learning_rate=4e-3 \
  --warmup_steps=100 \
  --steps_per_loop=100 \
  --model_dir="${MODEL_DIR}" \
  "$@"
