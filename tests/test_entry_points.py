"""Every command line's surface: `--help`, flag help, run time, and no C++ noise.

The entry points other than the trainer (tests/test_readme.py) and the
launcher (tests/test_launch.py): `distopt.compare`, `distopt.hardware_check`
(its full run is in tests/test_hardware_check.py, the example's in
tests/test_keras_wrap.py), the benchmarks, and plain library use.
"""

import argparse
import importlib
import re

import pytest
from conftest import run_python

BENCHMARKS = [
    "distopt.benchmarks.adam_step",
    "distopt.benchmarks.compression_accuracy",
    "distopt.benchmarks.compression_cost",
    "distopt.benchmarks.keras_fit",
    "distopt.benchmarks.sharded_state",
    "distopt.benchmarks.step_breakdown",
    "distopt.benchmarks.sync_modes",
    "distopt.benchmarks.time_to_accuracy",
    "distopt.benchmarks.trainer_vs_keras",
]
TOOLS = ["distopt.compare", "distopt.hardware_check", *BENCHMARKS]

# TensorFlow's C++ log lines and start-up banner, as the issue lists them.
NOISE = re.compile(r"^(E0000|W0000) |cuda_platform|absl::InitializeLog", re.MULTILINE)

HELP_RUN = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code
print(f"EXIT {code} TENSORFLOW {'tensorflow' in sys.modules}")
"""


def _run(*args, timeout, tf_log_level=None):
    """`python *args` in the repository, as a user runs it: no log level set."""
    return run_python(*args, timeout=timeout, tf_log_level=tf_log_level)


@pytest.mark.parametrize("module", TOOLS)
def test_help_exits_0_and_prints_the_docstring(module):
    proc = _run("-c", HELP_RUN, module, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    *help_text, last = proc.stdout.rstrip().splitlines()
    # --help answers before TensorFlow's import (4-9 s here).
    assert last == "EXIT 0 TENSORFLOW False", proc.stdout[-2000:]
    doc = importlib.import_module(module).__doc__
    first = next(line for line in doc.splitlines() if line.strip())
    assert first.strip() in "\n".join(help_text)
    assert not NOISE.search(proc.stdout + proc.stderr), proc.stderr


def _argparse_options(module, monkeypatch, capsys):
    """`(option, help)` of every argument `module.main` defines, from `--help`."""
    seen = []
    add = argparse.ArgumentParser.add_argument

    def recording(self, *names, **kwargs):
        seen.append((names[0], kwargs.get("help")))
        return add(self, *names, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "add_argument", recording)
    main = getattr(module, "parse_args", None) or module.main
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    capsys.readouterr()
    return [(name, text) for name, text in seen if name not in ("-h", "--help")]


@pytest.mark.parametrize("module", TOOLS)
def test_every_flag_has_help_text(module, monkeypatch, capsys):
    mod = importlib.import_module(module)
    flag_values = getattr(mod, "_FLAGS", None) or getattr(mod, "FLAGS", None)
    if flag_values is not None:
        options = [(name, flag_values[name].help) for name in flag_values]
    else:
        options = _argparse_options(mod, monkeypatch, capsys)
    assert options
    missing = [name for name, text in options if not text or text == argparse.SUPPRESS]
    # Suppressed ones are internal (a measurement's re-entry) and say so.
    internal = [name for name, text in options if text == argparse.SUPPRESS]
    assert set(missing) == set(internal), missing


@pytest.mark.parametrize("module", BENCHMARKS)
def test_benchmark_docstring_says_how_long_its_default_run_takes(module):
    doc = importlib.import_module(module).__doc__
    assert re.search(r"Default run: about \d+(-\d+)? (s|min) on this 2-core", doc)


# The smallest run of each entry point whose own process imports TensorFlow
# (a benchmark's measurement re-entry where the benchmark runs in children;
# their output is only shown when they fail). sync_modes's workers need two
# processes and import TensorFlow as the others do (package first).
SMALLEST = {
    "library": (
        "-c",
        (
            "import distopt, tensorflow as tf\n"
            "v = tf.Variable([1.0])\n"
            "distopt.optimizers.Adam(0.1).apply_gradients([tf.constant([1.0])], [v])\n"
            "print(v.numpy())"
        ),
    ),
    "compare": (
        "-m",
        "distopt.compare",
        "--optimizers=gradient_descent",
        "--learning_rates=0.1",
        "--max_iters=20",
    ),
    "adam_step": (
        "-m",
        "distopt.benchmarks.adam_step",
        "--measure=distopt",
        "--sets=tiny",
        "--optimizers=adam",
        "--steps=1",
    ),
    "keras_fit": (
        "-m",
        "distopt.benchmarks.keras_fit",
        "--measure=distopt",
        "--strategies=default",
        "--steps=1",
        "--warmup_steps=1",
        "--hidden=8",
    ),
    "step_breakdown": (
        "-m",
        "distopt.benchmarks.step_breakdown",
        "--model=mlp",
        "--steps=1",
        "--rounds=1",
        "--repeats=0",
    ),
    "trainer_vs_keras": (
        "-m",
        "distopt.benchmarks.trainer_vs_keras",
        "--measure=bare",
        "--models=mlp",
        "--strategies=default",
        "--steps=1",
        "--warmup_steps=1",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALLEST)
def test_no_tensorflow_noise(name):
    proc = _run(*SMALLEST[name], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    noise = NOISE.findall(proc.stdout + proc.stderr)
    assert not noise, proc.stderr[-3000:]


def test_library_noise_is_kept_when_the_user_asks_for_it():
    """TF_CPP_MIN_LOG_LEVEL=0: TensorFlow's own start-up lines, all of them."""
    proc = _run(
        "-c",
        "import distopt, tensorflow as tf, sys\n"
        "tf.config.list_physical_devices()\n"
        "print('mine', file=sys.stderr)",
        timeout=120,
        tf_log_level="0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "absl::InitializeLog" in proc.stderr
    assert proc.stderr.rstrip().endswith("mine")
