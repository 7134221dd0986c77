"""A mutation sweep: small planted bugs that the tests must catch.

Not a test module (pytest does not collect it). Run it by hand after
changing the numerics or the fault handling:

    python tests/mutation_sweep.py                # every mutant
    python tests/mutation_sweep.py adam_lr lion_betas

Each mutant is one textual change of the kind a review plants: a factor of
1.001 or 1.01 in a rate, normaliser or clip, an epsilon doubled, an
off-by-one in a threshold, `reduce_any` for `reduce_all`, a write dropped.
It is applied to a scratch `git worktree` of HEAD (commit first; the
checkout is never touched), and the test modules that own the code run with `-x`. A mutant
that leaves them passing is a hole: add a test that fails on it. First the
owning modules run once unmutated (`baseline`): a test that already fails
would count every mutant it owns as caught (2026-12-06: one did).

Two known mutants are equivalent, and are listed so that nobody "fixes"
them again:
* `run_norms_rows`: a common factor in both norms of a trust ratio
  cancels.
* `weight_zero_guard`: dropping `norm > 0` from the normaliser's guard
  changes nothing. A zero total still fails the guard's `is_finite(1 / norm)`,
  and a negative total cannot arrive, because a negative weight is sent as
  NaN.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Mutant(NamedTuple):
    name: str
    path: str
    old: str
    new: str
    tests: str  # pytest arguments: modules, then options such as -k


EQUIVALENT = {"run_norms_rows", "weight_zero_guard"}

MUTANTS = [
    Mutant(
        "adam_lr",
        "distopt/optimizers/adam.py",
        "alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)",
        "alpha = lr * 1.001 * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)",
        "tests/test_optimizers.py",
    ),
    Mutant(
        "adam_eps",
        "distopt/optimizers/adam.py",
        "(tf.sqrt(denom_v) + epsilon)",
        "(tf.sqrt(denom_v) + 2 * epsilon)",
        "tests/test_optimizers.py",
    ),
    Mutant(
        "adam_amsgrad",
        "distopt/optimizers/adam.py",
        "vhat = tf.maximum(vhat, v)",
        "vhat = v",
        "tests/test_optimizers.py",
    ),
    Mutant(
        "lamb_ratio",
        "distopt/optimizers/lamb.py",
        "numerator_norm / safe, one)",
        "numerator_norm / safe * 1.001, one)",
        "tests/test_optimizers.py",
    ),
    Mutant(
        "lamb_eps",
        "distopt/optimizers/lamb.py",
        "v_sqrt = tf.sqrt(v / (1.0 - beta_2_power)) + epsilon",
        "v_sqrt = tf.sqrt(v / (1.0 - beta_2_power)) + 2 * epsilon",
        "tests/test_optimizers.py",
    ),
    Mutant(
        "wd_scale",
        "distopt/optimizers/base.py",
        "p = p - lr * self.weight_decay * p",
        "p = p - 1.01 * lr * self.weight_decay * p",
        "tests/test_optimizers.py",
    ),
    Mutant(
        "sparse_wd_touched_only",
        "distopt/optimizers/base.py",
        "            var.assign(decayed)\n",
        "            pass\n",
        "tests/test_sparse.py",
    ),
    Mutant(
        "grad_scale",
        "distopt/optimizers/base.py",
        "g = g * tf.cast(scale, dtype)\n        lr = tf.cast(lr, dtype)\n        p = tf.cast(p0, dtype)",
        "g = g * tf.cast(scale * 1.001, dtype)\n        lr = tf.cast(lr, dtype)\n        p = tf.cast(p0, dtype)",
        "tests/test_strategies.py tests/test_numerics.py",
    ),
    Mutant(
        "weighted_norm",
        "distopt/aggregation.py",
        "    def normalizer(self, total_weight, num_replicas):\n        del num_replicas\n        return total_weight\n\n\n_REGISTRY",
        "    def normalizer(self, total_weight, num_replicas):\n        del num_replicas\n        return total_weight * 1.001\n\n\n_REGISTRY",
        "tests/test_sync.py tests/test_strategies.py tests/test_numerics.py",
    ),
    Mutant(
        "sum_norm",
        "distopt/aggregation.py",
        "return total_weight / tf.cast(num_replicas, total_weight.dtype)",
        "return total_weight / tf.cast(num_replicas, total_weight.dtype) * 1.001",
        "tests/test_sync.py tests/test_strategies.py tests/test_numerics.py",
    ),
    Mutant(
        "clipnorm_loose",
        "distopt/transforms.py",
        "tf.clip_by_global_norm(grads, self.clipnorm)",
        "tf.clip_by_global_norm(grads, self.clipnorm * 1.01)",
        "tests/test_strategies.py tests/test_numerics.py tests/test_optimizers.py",
    ),
    Mutant(
        "clipvalue_loose",
        "distopt/transforms.py",
        "tf.clip_by_value(g, -self.clipvalue, self.clipvalue)",
        "tf.clip_by_value(g, -self.clipvalue * 1.01, self.clipvalue * 1.01)",
        "tests/test_numerics.py",
    ),
    Mutant(
        "loss_scale_growth",
        "distopt/transforms.py",
        "tf.where(grow, scale * 2.0, scale)",
        "tf.where(grow, scale * 4.0, scale)",
        "tests/test_numerics.py tests/test_strategies.py tests/test_optimizers.py",
    ),
    Mutant(
        "rmsprop_rho",
        "distopt/optimizers/rmsprop.py",
        "velocity = rho * velocity + (1 - rho) * tf.square(grad)",
        "velocity = rho * velocity + (1 - rho) * 1.001 * tf.square(grad)",
        "tests/test_optimizers.py",
    ),
    Mutant(
        "rmsprop_centered",
        "distopt/optimizers/rmsprop.py",
        "average_grad = rho * average_grad + (1 - rho) * grad",
        "average_grad = rho * average_grad + (1 - rho) * 1.01 * grad",
        "tests/test_optimizers.py",
    ),
    Mutant(
        "adagrad_eps",
        "distopt/optimizers/adagrad.py",
        "tf.sqrt(accumulator + epsilon)",
        "tf.sqrt(accumulator + 2 * epsilon)",
        "tests/test_optimizers.py",
    ),
    Mutant(
        "nesterov",
        "distopt/optimizers/gradient_descent.py",
        "step = m * momentum - grad * lr if nesterov else m",
        "step = m * momentum - grad * lr * 1.001 if nesterov else m",
        "tests/test_optimizers.py",
    ),
    Mutant(
        "lion_betas",
        "distopt/optimizers/lion.py",
        "return new_var, m * beta_2 + grad * (1.0 - beta_2)",
        "return new_var, m * beta_1 + grad * (1.0 - beta_1)",
        "tests/test_optimizers.py",
    ),
    Mutant(
        "outer_pseudo_sign",
        "distopt/sync/periodic.py",
        "lambda *xs: [a - m for a, m in zip(xs[: len(rest)], xs[len(rest) :])]",
        "lambda *xs: [(a - m) * 1.001 for a, m in zip(xs[: len(rest)], xs[len(rest) :])]",
        "tests/test_sync.py",
    ),
    Mutant(
        "run_norms_rows",
        "distopt/optimizers/base.py",
        "n = tf.sqrt(tf.reduce_sum(tf.square(rows), axis=1, keepdims=True))",
        "n = tf.sqrt(tf.reduce_sum(tf.square(rows), axis=1, keepdims=True) * 1.001)",
        "tests/test_optimizers.py tests/test_numerics.py",
    ),
    Mutant(
        "accumulate_last",
        "distopt/sync/accumulate.py",
        "is_last = tf.equal((self.micro_step + 1) % self.k, 0)",
        "is_last = tf.equal((self.micro_step) % self.k, 0)",
        "tests/test_sync.py",
    ),
    Mutant(
        "loss_scale_shrink",
        "distopt/transforms.py",
        "tf.maximum(scale * 0.5, 1.0)",
        "tf.maximum(scale * 0.25, 1.0)",
        "tests/test_numerics.py tests/test_strategies.py tests/test_optimizers.py",
    ),
    Mutant(
        "loss_scale_floor",
        "distopt/transforms.py",
        "tf.maximum(scale * 0.5, 1.0)",
        "tf.maximum(scale * 0.5, 0.5)",
        "tests/test_numerics.py -k loss_scale",
    ),
    Mutant(
        "cosine_warmup_edge",
        "distopt/optimizers/schedules.py",
        "return tf.where(t < self.warmup_steps, warm, decayed)",
        "return tf.where(t <= self.warmup_steps, warm, decayed)",
        "tests/test_optimizers.py",
    ),
    Mutant(
        "cosine_alpha",
        "distopt/optimizers/schedules.py",
        "(self.alpha + (1.0 - self.alpha) * cos)",
        "(self.alpha + (1.0 - self.alpha) * cos * 1.001)",
        "tests/test_optimizers.py",
    ),
    Mutant(
        "skip_any_vs_all",
        "distopt/transforms.py",
        "return grads, tf.reduce_all(tf.stack(finite)) if finite else None\n",
        "return grads, tf.reduce_any(tf.stack(finite)) if finite else None\n",
        "tests/test_numerics.py -k nonfinite",
    ),
    Mutant(
        "local_sgd_no_slot_avg",
        "distopt/sync/periodic.py",
        "        if slot_vars and not self.average_slots:\n",
        "        if False:\n",
        "tests/test_sync.py",
    ),
    Mutant(
        "outer_no_copy",
        "distopt/sync/periodic.py",
        "            _copy(strategy, anchors, variables)\n",
        "            pass\n",
        "tests/test_sync.py",
    ),
    Mutant(
        "lars_eta",
        "distopt/optimizers/lars.py",
        "local_lr = tf.where(ok, eta * w_norm / tf.where(ok, denominator, 1.0), 1.0)",
        "local_lr = tf.where(ok, eta * w_norm / tf.where(ok, denominator, 1.0) * 1.001, 1.0)",
        "tests/test_optimizers.py",
    ),
    Mutant(
        "lion_sign",
        "distopt/optimizers/lion.py",
        "tf.sign(m * beta_1 + grad * (1.0 - beta_1))",
        "tf.sign(m * beta_2 + grad * (1.0 - beta_2))",
        "tests/test_optimizers.py",
    ),
    Mutant(
        "accumulate_sparse_overwrites",
        "distopt/sync/accumulate.py",
        "acc.scatter_add(",
        "acc.scatter_update(",
        "tests/test_sparse.py",
    ),
    Mutant(
        "sam_radius",
        "distopt/optimizers/sam.py",
        "scale = self.rho / (norm + self.epsilon)",
        "scale = self.rho * 1.001 / (norm + self.epsilon)",
        "tests/test_sam_heun.py",
    ),
    Mutant(
        "heun_average",
        "distopt/optimizers/heun.py",
        "return 0.5 * (tf.convert_to_tensor(a) + tf.convert_to_tensor(b))",
        "return 0.501 * (tf.convert_to_tensor(a) + tf.convert_to_tensor(b))",
        "tests/test_sam_heun.py",
    ),
    Mutant(
        "local_sgd_warmup_edge",
        "distopt/sync/periodic.py",
        "in_warmup = self.step < self.warmup_steps",
        "in_warmup = self.step <= self.warmup_steps",
        "tests/test_sync.py",
    ),
    Mutant(
        "piecewise_side",
        "distopt/optimizers/schedules.py",
        'side="right",',
        'side="left",',
        "tests/test_optimizers.py",
    ),
    Mutant(
        "staircase_round",
        "distopt/optimizers/schedules.py",
        "p = tf.floor(p)",
        "p = tf.round(p)",
        "tests/test_optimizers.py",
    ),
    Mutant(
        "lr_schedule_step",
        "distopt/optimizers/base.py",
        "return tf.cast(lr(self.iterations), tf.float32)",
        "return tf.cast(lr(self.iterations + 1), tf.float32)",
        "tests/test_optimizers.py",
    ),
    Mutant(
        "weight_zero_guard",
        "distopt/reduce.py",
        "positive = tf.logical_and(tf.math.is_finite(norm), norm > 0)",
        "positive = tf.math.is_finite(norm)",
        "tests/test_numerics.py tests/test_sync.py",
    ),
    Mutant(
        "diverge_tolerates_one",
        "distopt/trainer_faults.py",
        'if self.policy == "stop" and bad_total > 0:',
        'if self.policy == "stop" and bad_total > 1:',
        "tests/test_faults.py -k exactly_the_limit",
    ),
    Mutant(
        "skip_run_off_by_one",
        "distopt/trainer_faults.py",
        "if run >= self.max_skipped:",
        "if run > self.max_skipped:",
        "tests/test_faults.py -k exactly_the_limit",
    ),
    Mutant(
        "verify_reads_nothing",
        "distopt/checkpoints.py",
        "    for name in reader.get_variable_to_shape_map():\n        reader.get_tensor(name)\n",
        "    del reader\n",
        "tests/test_faults.py -k state_file",
    ),
    Mutant(
        "candidates_oldest_first",
        "distopt/checkpoints.py",
        "return sorted(found, key=found.get, reverse=True)",
        "return sorted(found, key=found.get)",
        "tests/test_faults.py -k state_file",
    ),
    Mutant(
        "state_file_keeps_bad",
        "distopt/checkpoints.py",
        "remaining = [p for p in reversed(found) if p not in bad]",
        "remaining = list(reversed(found))",
        "tests/test_faults.py -k state_file",
    ),
    Mutant(
        "adamax_eps",
        "distopt/optimizers/adamax.py",
        "((1 - beta_1_power) * (u + epsilon))",
        "((1 - beta_1_power) * (u + 2 * epsilon))",
        "tests/test_optimizers.py -k adamax",
    ),
    Mutant(
        "adamax_signed_norm",
        "distopt/optimizers/adamax.py",
        "u = tf.maximum(beta_2 * u, tf.abs(grad))",
        "u = tf.maximum(beta_2 * u, grad)",
        "tests/test_optimizers.py -k adamax",
    ),
    # Keras's clipnorm: each variable by its own norm.
    Mutant(
        "per_variable_clipnorm_loose",
        "distopt/transforms.py",
        "return [tf.clip_by_norm(g, self.clipnorm) for g in grads], None",
        "return [tf.clip_by_norm(g, self.clipnorm * 1.01) for g in grads], None",
        "tests/test_numerics.py -k clip",
    ),
    Mutant(
        "per_variable_clipnorm_global",
        "distopt/transforms.py",
        "return [tf.clip_by_norm(g, self.clipnorm) for g in grads], None",
        "return tf.clip_by_global_norm(grads, self.clipnorm)[0], None",
        "tests/test_numerics.py -k clip",
    ),
    # The moving average (`use_ema`).
    Mutant(
        "ema_momentum",
        "distopt/optimizers/base.py",
        "m = tf.cast(step > 1, ema.dtype) * self.ema_momentum",
        "m = tf.cast(step > 1, ema.dtype) * self.ema_momentum * 1.001",
        "tests/test_ema.py",
    ),
    Mutant(
        "ema_first_update",
        "distopt/optimizers/base.py",
        "m = tf.cast(step > 1, ema.dtype)",
        "m = tf.cast(step > 0, ema.dtype)",
        "tests/test_ema.py",
    ),
    Mutant(
        "ema_overwrite_off_by_one",
        "distopt/optimizers/base.py",
        "overwrite = tf.equal(step % self.ema_overwrite_frequency, 0)",
        "overwrite = tf.equal(step % self.ema_overwrite_frequency, 1)",
        "tests/test_optimizers.py -k ema",
    ),
    Mutant(
        "ema_sparse_rows_dropped",
        "distopt/optimizers/base.py",
        "            slots[EMA].assign(new_ema, read_value=False)\n",
        "",
        "tests/test_ema.py",
    ),
    Mutant(
        "ema_not_kept_on_a_skip",
        "distopt/optimizers/base.py",
        "    return new_p, {n: tf.where(keep, old[n], new_slots[n]) for n in old}\n",
        "    return new_p, {**new_slots, **{n: tf.where(keep, old[n], new_slots[n])"
        " for n in old if n != EMA}}\n",
        "tests/test_ema.py",
    ),
    Mutant(
        "wrap_finalize_dropped",
        "distopt/keras.py",
        "        self._inner.finalize_variable_values(self._tf_variables(",
        "        return\n        self._inner.finalize_variable_values(self._tf_variables(",
        "tests/test_keras_wrap.py -k fit_matches",
    ),
    Mutant(
        "trainer_finalize_dropped",
        "distopt/trainer/loop.py",
        "                run.optimizer.finalize_variable_values(run.model.trainable_variables)\n",
        "                pass\n",
        "tests/test_train.py -k use_ema",
    ),
    # --- Misuse, arguments, restores into a fresh optimizer ------------------
    Mutant(
        "scope_check_skipped_without_strategy",
        "distopt/distribute.py",
        "            if isinstance(v, tf.distribute.DistributedValues):",
        "            if False:",
        "tests/test_numerics.py -k outside_its_scope",
    ),
    Mutant(
        "variable_learning_rate_frozen",
        "distopt/optimizers/schedules.py",
        "            )\n        return learning_rate\n",
        "            )\n        return check_rate('learning_rate', learning_rate)\n",
        "tests/test_numerics.py -k variable_learning_rate",
    ),
    Mutant(
        "traced_rate_not_noted",
        "distopt/optimizers/base.py",
        "            self._traced_rate = lr",
        "            self._traced_rate = None",
        "tests/test_numerics.py -k variable_learning_rate",
    ),
    Mutant(
        "restore_replicas_skips_unbuilt",
        "distopt/optimizers/base.py",
        "        self.build(var_list)\n        with self._strategy.scope():",
        "        if not self._built:\n            return\n"
        "        with self._strategy.scope():",
        "tests/test_sync.py -k snapshot_resume_equals",
    ),
    Mutant(
        "sync_built_in_the_trace",
        "distopt/optimizers/base.py",
        "            with tf.init_scope(), strategy.scope():\n"
        "                self.sync.build(",
        "            with strategy.scope():\n                self.sync.build(",
        "tests/test_sync.py -k resume_equals_uninterrupted_run",
    ),
    Mutant(
        "numpy_integer_refused",
        "distopt/checks.py",
        "    integral = isinstance(value, numbers.Integral) and not",
        "    integral = isinstance(value, int) and not",
        "tests/test_sync.py -k numpy_integers",
    ),
    Mutant(
        "warmup_steps_truncated",
        "distopt/sync/periodic.py",
        'check_int("warmup_steps", warmup_steps, 0)',
        "int(warmup_steps)",
        "tests/test_sync.py -k bad_sync_arguments",
    ),
    Mutant(
        "outer_optimizer_any_builder",
        "distopt/sync/periodic.py",
        'for m in ("build", "apply_update")',
        'for m in ("build",)',
        "tests/test_sync.py -k bad_sync_arguments",
    ),
    Mutant(
        "lock_directories_kept",
        "distopt/checkpoints.py",
        "            made_dirs.remove_if_empty(self._made)",
        "            pass",
        "tests/test_train.py -k input_refused_after",
    ),
    Mutant(
        "save_failure_run_dir_not_named",
        "distopt/train.py",
        'lambda m: f"rerun with --model_dir={config.model_dir} to {m[1]}"',
        "lambda m: m[0]",
        "tests/test_preflight.py -k failed_save_names",
    ),
    Mutant(
        "keras_inner_loss_scale_skipped",
        "distopt/keras.py",
        "        return self._inner.scale_loss(loss)",
        "        return loss",
        "tests/test_keras_wrap.py -k loss_scale_in_fit",
    ),
    Mutant(
        "keras_unscaled_loss_accepted",
        "distopt/keras.py",
        '            (self._aggregation != "sum" and replicas > 1)',
        "            False",
        "tests/test_keras_wrap.py -k mixed_float16",
    ),
    Mutant(
        "keras_stale_own_weights_written_back",
        "distopt/keras.py",
        "        if self._own_weights_at == int(self.iterations.numpy()):",
        "        if True:",
        "tests/test_keras_wrap.py -k interrupted_evaluation",
    ),
    Mutant(
        "keras_wraps_heun",
        "distopt/keras.py",
        '        if getattr(optimizer, "needs_loss", False):',
        "        if False:",
        "tests/test_keras_wrap.py -k refuses_what",
    ),
    Mutant(
        "keras_lr_variable_frozen",
        "distopt/keras.py",
        "        elif isinstance(lr, tf.Variable):",
        "        elif False:",
        "tests/test_keras_wrap.py -k refuses_what",
    ),
    Mutant(
        "keras_second_wrap_checked_late",
        "distopt/keras.py",
        '        ownership.check_free([(optimizer, "optimizer")])\n',
        "",
        "tests/test_keras_wrap.py -k second_wrap",
    ),
    Mutant(
        "outer_optimizer_class_accepted",
        "distopt/sync/periodic.py",
        "    if isinstance(outer, type) or not all(  # The class, not an instance of it.",
        "    if not all(",
        "tests/test_sync.py -k bad_sync_arguments",
    ),
    Mutant(
        "compare_write_error_traceback",
        "distopt/compare.py",
        "    except OSError as e:  # Writing the results (a full disk): one line.",
        "    except ZeroDivisionError as e:",
        "tests/test_compare.py -k rerun_replaces",
    ),
    Mutant(
        "study_results_written_in_place",
        "distopt/study.py",
        '    output_files.write_atomically(path, text + "\\n")',
        '    open(path, "w").write(text + "\\n")',
        "tests/test_compare.py -k rerun_replaces",
    ),
    Mutant(
        "study_figure_written_in_place",
        "distopt/study_figures.py",
        "    output_files.write_atomically(path, png.getvalue())",
        '    open(path, "wb").write(png.getvalue())',
        "tests/test_compare.py -k rerun_replaces",
    ),
    Mutant(
        "study_stale_figures_kept",
        "distopt/study_figures.py",
        "    _remove_stale_paths_figures(output_dir, written)\n",
        "",
        "tests/test_compare.py -k rerun_replaces",
    ),
    Mutant(
        "compare_max_iters_unbounded",
        "distopt/compare.py",
        "    if not 1 <= f.max_iters <= _MAX_ITERS:",
        "    if not 1 <= f.max_iters:",
        "tests/test_compare.py -k bad_input_clear",
    ),
    Mutant(
        "compare_ctrl_c_traceback",
        "distopt/compare.py",
        "    except KeyboardInterrupt:\n",
        "    except ZeroDivisionError:\n",
        "tests/test_compare.py -k memory_follows",
    ),
    Mutant(
        "link_stats_os_access",
        "launch/local.py",
        'why = output_files.check_file(args.link_stats, "link_stats")',
        'why = None if os.access(os.path.dirname(os.path.abspath(args.link_stats)), os.W_OK) else "no"',
        "tests/test_launch.py -k link_flag_errors",
    ),
    Mutant(
        "link_stats_plain_write",
        "launch/local.py",
        "output_files.write_json(path, stats)",
        'open(path, "w").write(str(stats))',
        "tests/test_launch.py -k full_disk",
    ),
    Mutant(
        "launcher_usage_block",
        "launch/local.py",
        "    parser = _Parser(",
        "    parser = argparse.ArgumentParser(",
        "tests/test_launch.py -k one_error_line",
    ),
    Mutant(
        "probe_seconds_zero",
        "launch/link_probe.py",
        "math.isfinite(value) and value > 0",
        "math.isfinite(value) and value >= 0",
        "tests/test_launch.py -k link_probe_needs",
    ),
    Mutant(
        "probe_ctrl_c_traceback",
        "launch/link_probe.py",
        "        return 130",
        "        raise",
        "tests/test_launch.py -k link_probe_interrupted",
    ),
    Mutant(
        "hc_json_checked_late",
        "distopt/hardware_check.py",
        'why = _FLAGS.json and output_files.check_file(_FLAGS.json, "json")',
        "why = None",
        "tests/test_hardware_check.py -k refused_before_any_check",
    ),
    Mutant(
        "hc_json_write_status",
        "distopt/hardware_check.py",
        "return status or EXIT_NOT_WRITTEN",
        "return status",
        "tests/test_hardware_check.py -k json_write_that_fails",
    ),
    Mutant(
        "hc_tpu_unresolved",
        "distopt/hardware_check.py",
        "        strategy = _tpu_strategy(tpu)",
        '        strategy = distribute.make_strategy("tpu", tpu=tpu)',
        "tests/test_hardware_check.py -k tpu_that_cannot",
    ),
    Mutant(
        "output_file_unnamed",
        "distopt/output_files.py",
        "        e.filename = path\n",
        "",
        "tests/test_compare.py -k rerun_replaces",
    ),
    Mutant(
        "benchmark_warmup_0_fits",
        "distopt/benchmarks/protocol.py",
        "    if steps > 0:\n",
        "    if steps >= 0:\n",
        "tests/test_benchmarks.py -k warm_up",
    ),
    Mutant(
        "benchmark_stop_signals_uncaught",
        "distopt/benchmarks/protocol.py",
        "    return {s: signal.signal(s, lambda n, _: stop.append(n)) for s in _STOP_SIGNALS}",
        "    return {}",
        "tests/test_benchmarks.py -k stopped_benchmark",
    ),
    Mutant(
        "benchmark_output_unchecked",
        "distopt/benchmarks/protocol.py",
        "            if why:\n                self.error(why)",
        "            if False:\n                self.error(why)",
        "tests/test_benchmarks.py -k output_path",
    ),
    Mutant(
        "benchmark_write_not_atomic",
        "distopt/benchmarks/protocol.py",
        "        output_files.write_json(path, results)\n",
        "        with open(path, 'w') as f:\n            f.write(json.dumps(results))\n            os.fsync(f.fileno())\n",
        "tests/test_benchmarks.py -k failed_write",
    ),
    Mutant(
        "benchmark_list_names_unchecked",
        "distopt/benchmarks/protocol.py",
        "            if item not in allowed and not (prefix and item.startswith(prefix)):",
        "            if False:",
        "tests/test_benchmarks.py -k bad_name_or_count",
    ),
    Mutant(
        "adam_step_failures_exit_0",
        "distopt/benchmarks/adam_step.py",
        "    if protocol.no_results(PROG, samples):",
        "    if False:",
        "tests/test_benchmarks.py -k every_run_failing",
    ),
    Mutant(
        "sharded_one_device",
        "distopt/benchmarks/sharded_state.py",
        "lower_bound=2",
        "lower_bound=1",
        "tests/test_benchmarks.py -k bad_name_or_count",
    ),
    Mutant(
        "tta_report_only_makes_dir",
        "distopt/benchmarks/time_to_accuracy.py",
        "    path = os.path.join(output_dir, RUNS)\n    if not os.path.isfile(path):",
        "    path = os.path.join(output_dir, RUNS)\n    os.makedirs(output_dir, exist_ok=True)\n    if not os.path.isfile(path):",
        "tests/test_benchmarks.py -k creates_nothing",
    ),
    Mutant(
        "tta_rerun_repeats_runs",
        "distopt/benchmarks/time_to_accuracy.py",
        "        if key in recorded:",
        "        if False:",
        "tests/test_benchmarks.py -k counts_each_run_once",
    ),
    Mutant(
        "tta_report_counts_duplicates",
        "distopt/benchmarks/time_to_accuracy.py",
        "                runs.setdefault(run_key(run), run)",
        "                runs[lines] = run",
        "tests/test_benchmarks.py -k counts_each_run_once",
    ),
    Mutant(
        "sync_modes_batch_not_split",
        "distopt/benchmarks/protocol.py",
        "        if value % divisor:",
        "        if False:",
        "tests/test_benchmarks.py -k bad_name_or_count",
    ),
    Mutant(
        "tta_output_dir_unchecked",
        "distopt/benchmarks/time_to_accuracy.py",
        '        problems = paths.check_model_dir(FLAGS.output_dir, flag_name="output_dir")\n        if problems:',
        '        problems = paths.check_model_dir(FLAGS.output_dir, flag_name="output_dir")\n        if False:',
        "tests/test_benchmarks.py -k output_path",
    ),
    Mutant(
        "made_dirs_removed_shallowest_first",
        "distopt/made_dirs.py",
        "    for directory in reversed(created):",
        "    for directory in created:",
        "tests/test_write_failures.py -k removes_only",
    ),
    Mutant(
        "made_dirs_kept_after_a_failure",
        "distopt/made_dirs.py",
        "        except OSError:\n            remove_if_empty(created)\n            raise",
        "        except OSError:\n            raise",
        "tests/test_write_failures.py -k removes_only",
    ),
    Mutant(
        "run_dir_parents_kept",
        "distopt/trainer/paths.py",
        "        made_dirs.remove_if_empty(self.created)",
        "        pass",
        "tests/test_preflight.py -k leaves_no_run_directory",
    ),
    Mutant(
        "preempted_run_dir_not_named",
        "distopt/train.py",
        '        f"Rerun with --model_dir={config.model_dir} to resume",',
        "        trainer_faults.RERUN_TO_RESUME,",
        "tests/test_faults.py -k while_tensorflow_loads",
    ),
    Mutant(
        "compressor_defaults_compared_as_flags",
        "distopt/trainer/checkpointing.py",
        'if key == "compression_args" and _same_compressor(stored, config):',
        "if False:",
        "tests/test_train.py -k spelling_the_compressors",
    ),
    Mutant(
        "launched_strategy_unchecked",
        "distopt/train.py",
        "    if launched and strategy != launched:",
        "    if False:",
        "tests/test_launch.py -k under_the_launcher",
    ),
    Mutant(
        "launcher_strategy_not_told",
        "launch/local.py",
        '    env["DISTOPT_LAUNCHER_STRATEGY"] = STRATEGY',
        "    pass",
        "tests/test_launch.py -k later_strategy",
    ),
    Mutant(
        "launcher_command_unchecked",
        "launch/local.py",
        "    error = _check_command(args.command) if args.command is not None else None",
        "    error = None",
        "tests/test_launch.py -k 'command_that_cannot_run'",
    ),
    Mutant(
        "checkpoints_relative_dir_not_canonical",
        "distopt/checkpoints.py",
        "    directory = _canonical(directory)\n    found = {}\n",
        "    found = {}\n",
        "tests/test_faults.py -k relative_model_dir",
    ),
    # --- Sharded optimizer state (ZeRO-1) ------------------------------------
    Mutant(
        "shard_boundary_off_by_one",
        "distopt/optimizers/sharded.py",
        "lo, hi = r * self.shard_size, (r + 1) * self.shard_size",
        "lo, hi = r * self.shard_size, (r + 1) * self.shard_size - (r == 0)",
        "tests/test_sharded.py",
    ),
    Mutant(
        "shard_norm_over_the_shard",
        "distopt/optimizers/sharded.py",
        "(totals,) = optimizer.reducer.all_reduce(strategy, [partial])",
        "totals = partial",
        "tests/test_sharded.py",
    ),
    Mutant(
        "shard_gather_skipped_on_one_replica",
        "distopt/optimizers/sharded.py",
        "    flat = tf.reshape(rows, [-1])\n    written = ",
        "    flat = tf.reshape(rows, [-1])\n    if copies[0].device.endswith('CPU:1'):\n"
        "        return\n    written = ",
        "tests/test_sharded.py",
    ),
    Mutant(
        "shard_empty_group_stepped",
        "distopt/optimizers/sharded.py",
        "if group.total == 0 or not any(i in given for i in group.members):",
        "if not any(i in given for i in group.members):",
        "tests/test_sharded.py -k empty_variables",
    ),
    # --- Compression with error feedback -----------------------------------
    Mutant(
        "compression_feedback_dropped",
        "distopt/compression/base.py",
        "xs = _add_residuals(\n"
        "                    strategy, xs, indices, self.residuals, self.error_feedback_decay\n"
        "                )",
        "xs = list(xs)",
        "tests/test_compression.py",
    ),
    Mutant(
        "compression_decay_ignored",
        "distopt/compression/base.py",
        "        if decay != 1.0:\n            r = ",
        "        if False:\n            r = ",
        "tests/test_compression.py -k decayed",
    ),
    Mutant(
        "compression_decay_not_saved",
        "distopt/compression/base.py",
        '            "error_feedback_decay": self.error_feedback_decay,\n',
        "",
        "tests/test_compression.py -k round_trip",
    ),
    Mutant(
        "compression_residual_updated_on_a_skip",
        "distopt/compression/base.py",
        "value = tf.where(ok, value, tf.convert_to_tensor(var))",
        "value = value",
        "tests/test_compression.py",
    ),
    Mutant(
        "powersgd_warm_start_lost",
        "distopt/compression/powersgd.py",
        "start = tf.convert_to_tensor(q)",
        "start = fresh",
        "tests/test_compression.py",
    ),
    Mutant(
        "onebit_scale_off",
        "distopt/compression/onebit.py",
        "scale = tf.reduce_mean(tf.abs(flat))",
        "scale = 1.01 * tf.reduce_mean(tf.abs(flat))",
        "tests/test_compression.py",
    ),
    Mutant(
        "adam_freeze_off_by_one",
        "distopt/optimizers/adam.py",
        "tf.where(step > freeze_step, v, new_v)",
        "tf.where(step >= freeze_step, v, new_v)",
        "tests/test_optimizers.py -k freeze",
    ),
    Mutant(
        "adam_freeze_bias_correction",
        "distopt/optimizers/adam.py",
        "tf.pow(tf.convert_to_tensor(beta_2, dt), v_step)",
        "tf.pow(tf.convert_to_tensor(beta_2, dt), step)",
        "tests/test_optimizers.py -k freeze",
    ),
    Mutant(
        "compression_args_checked_late",
        "distopt/trainer/config.py",
        "    make_compression(config)\n\n\ndef make_compression",
        "    pass\n\n\ndef make_compression",
        "tests/test_preflight.py tests/test_train.py -k compression",
    ),
    Mutant(
        "keras_save_drops_residuals",
        "distopt/optimizers/base.py",
        "            if isinstance(x, dist.LogicalState):\n                return True",
        "            if isinstance(x, dist.LogicalState):\n                return False",
        "tests/test_keras_wrap.py -k compression",
    ),
    Mutant(
        "by_replica_default",
        "distopt/distribute.py",
        "    if is_default(strategy):\n        return fn(0, 0)\n",
        "",
        "tests/test_compression.py -k default_strategy",
    ),
    Mutant(
        "sum_aggregate_share",
        "distopt/aggregation.py",
        "        return 1.0 / num_replicas",
        "        return 1.0",
        "tests/test_strategies.py -k outside_strategy_run",
    ),
    Mutant(
        "ownership_not_claimed",
        "distopt/ownership.py",
        "    if taken is not None:",
        "    if False:",
        "tests/test_compression.py tests/test_sync.py -k serve",
    ),
    Mutant(
        "resume_guard_reads_state_file",
        "distopt/trainer/checkpointing.py",
        "    latest = found[0] if found else None",
        "    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "
        "CHECKPOINT_SUBDIR))",
        "tests/test_train.py -k state_file",
    ),
    Mutant(
        "sam_base_not_guarded",
        "distopt/trainer/checkpointing.py",
        '    if config.optimizer == "sam" and isinstance(',
        '    if config.optimizer == "sa_m" and isinstance(',
        "tests/test_train.py -k base_optimizer",
    ),
    Mutant(
        "state_without_timestamps",
        "distopt/checkpoints.py",
        "        all_model_checkpoint_timestamps=[",
        "        all_model_checkpoint_timestamps=None and [",
        "tests/test_faults.py -k fallback_drops",
    ),
    Mutant(
        "no_evaluation_on_resume",
        "distopt/trainer/loop.py",
        "        self._evaluate_on_resume(current)\n",
        "",
        "tests/test_train.py -k evaluation_step",
    ),
    Mutant(
        "rerun_drops_figures",
        "distopt/trainer/loop.py",
        "                metrics = _with_measured_figures(metrics, path)",
        "                pass",
        "tests/test_train.py -k finished_run",
    ),
    Mutant(
        "optimizer_args_not_checked",
        "distopt/trainer/config.py",
        "    _check_optimizer_args(config)\n",
        "",
        "tests/test_preflight.py -k refused_first",
    ),
    Mutant(
        "boundaries_order_unchecked",
        "distopt/trainer/config.py",
        "    if boundaries != sorted(boundaries) or",
        "    if False and boundaries != sorted(boundaries) or",
        "tests/test_preflight.py -k refused_first",
    ),
    Mutant(
        "accumulate_without_update",
        "distopt/trainer/config.py",
        '    if config.sync == "accumulate" and total_steps < config.sync_period:',
        '    if config.sync == "accumulate" and total_steps < 0:',
        "tests/test_preflight.py -k refused_first",
    ),
    Mutant(
        "seed_range_unchecked",
        "distopt/trainer/config.py",
        "    need(0 <= config.seed < 2**32,",
        "    need(0 <= config.seed,",
        "tests/test_preflight.py -k out_of_range",
    ),
    Mutant(
        "model_dir_not_expanded",
        "distopt/train.py",
        '        model_dir=os.path.expanduser(FLAGS.model_dir or ""),',
        '        model_dir=FLAGS.model_dir or "",',
        "tests/test_preflight.py -k home_relative",
    ),
    Mutant(
        "early_notice_dropped",
        "distopt/trainer_faults.py",
        "        early = stop_notice.take()",
        "        early = None",
        "tests/test_faults.py -k while_tensorflow_loads",
    ),
    Mutant(
        "resume_past_the_end",
        "distopt/trainer/run.py",
        "    if run.start_step > run.total_steps:",
        "    if run.start_step > run.total_steps + 100:",
        "tests/test_train.py -k past_the_runs_end",
    ),
    Mutant(
        "replica_groups_unchecked",
        "distopt/trainer/run.py",
        "    _check_replica_groups(config, strategy)\n",
        "",
        "tests/test_train.py -k group_size_that",
    ),
    Mutant(
        "compare_output_dir_unchecked",
        "distopt/compare.py",
        "        if problems:\n            raise ValueError",
        "        if False:\n            raise ValueError",
        "tests/test_compare.py -k clear_message",
    ),
    Mutant(
        "failed_save_names_itself",
        "distopt/checkpoints.py",
        "            _remove_partial(self.directory, step)\n",
        "            _remove_partial(self.directory, step)\n"
        "            previous = self.manager.latest_checkpoint\n",
        "tests/test_faults.py -k state_file_names",
    ),
    Mutant(
        "launcher_host_unchecked",
        "launch/local.py",
        "    error = error or _check_host(args.host)\n",
        "",
        "tests/test_launch.py -k host_the_workers",
    ),
    Mutant(
        "given_aggregate_compressed",
        "distopt/reduce.py",
        "            and not self._given_aggregate\n",
        "",
        "tests/test_compression.py -k outside_strategy_run",
    ),
    Mutant(
        "clock_restarts_on_resume",
        "distopt/trainer/run.py",
        "    run.timing.seconds_before = seconds\n",
        "",
        "tests/test_train.py -k training_seconds_go_on",
    ),
    Mutant(
        "clock_keeps_later_steps",
        "distopt/trainer/checkpointing.py",
        "if s < step}",
        "if s != step}",
        "tests/test_train.py -k training_clock_keeps",
    ),
    Mutant(
        "benchmark_count_unchecked",
        "distopt/benchmarks/protocol.py",
        "        if value < minimum:",
        "        if value < minimum - 1:",
        "tests/test_benchmarks.py -k bad_flag",
    ),
    Mutant(
        "sam_base_by_name_unchecked",
        "distopt/optimizers/sam.py",
        "                _check_applies_gradients(registry.get_class(base_optimizer))\n",
        "",
        "tests/test_sam_heun.py -k bad_arguments",
    ),
    Mutant(
        "compare_ignored_flag_accepted",
        "distopt/compare.py",
        "        if f[name].present and not applies:",
        "        if f[name].present and not applies and name == 'seed':",
        "tests/test_compare.py -k clear_message",
    ),
    Mutant(
        "noise_scale_unchecked",
        "distopt/problems.py",
        '        if not 0 <= float(noise_scale) < float("inf"):',
        '        if float(noise_scale) == float("inf"):',
        "tests/test_compare.py -k clear_message",
    ),
    Mutant(
        "compressor_built_in_trace",
        "distopt/reduce.py",
        "            with tf.init_scope(), strategy.scope():\n"
        "                self.compression.build",
        "            with strategy.scope():\n                self.compression.build",
        "tests/test_compression.py -k restore_before_the_first",
    ),
    Mutant(
        "segment_sums_off_by_one",
        "distopt/optimizers/base.py",
        "        sums.append(tf.reduce_sum(x[start : start + length]))",
        "        sums.append(tf.reduce_sum(x[start : start + length - 1]))",
        "tests/test_sharded.py -k mlp_sized",
    ),
    Mutant(
        "claimed_by_the_constructor",
        "distopt/optimizers/base.py",
        "        ownership.check_free(self._owned.value)",
        '        ownership.claim_all(self._owned.value, "a constructor")',
        "tests/test_compression.py -k serves_one",
    ),
    Mutant(
        "build_claims_nothing",
        "distopt/optimizers/base.py",
        '        ownership.claim_all(self._owned.value, f"optimizer {self.name!r}")\n',
        "",
        "tests/test_compression.py -k serves_one",
    ),
    Mutant(
        "bool_check_truthy",
        "distopt/checks.py",
        '    raise ValueError(f"{name}: must be True or False, got {value!r}.")',
        "    return bool(value)",
        "tests/test_errors.py tests/test_compression.py -k 'other_bad or bad_arguments'",
    ),
    Mutant(
        "compression_args_change_resumes",
        "distopt/trainer/checkpointing.py",
        'RESUME_KEYS = ("optimizer", "sync", "compression", "compression_args")',
        'RESUME_KEYS = ("optimizer", "sync", "compression")',
        "tests/test_train.py -k refused_naming_the_flag",
    ),
    Mutant(
        "link_stats_unchecked",
        "launch/local.py",
        "    if args.link_stats:\n        # Written after the run",
        "    if False:\n        # Written after the run",
        "tests/test_launch.py -k link_flag_errors",
    ),
    Mutant(
        "topk_empty_variable",
        "distopt/compression/topk.py",
        "        if d == 0:  # A layer of 0 units",
        "        if d < 0:  # A layer of 0 units",
        "tests/test_compression.py -k empty_variable",
    ),
    Mutant(
        "wire_dtype_with_compression",
        "distopt/optimizers/base.py",
        "    if compression is not None and wire_dtype is not None:",
        "    if compression is not None and wire_dtype is None and False:",
        "tests/test_compression.py -k bad_arguments",
    ),
    Mutant(
        "accumulators_restored_as_a_share",
        "distopt/distribute.py",
        "        if value.shape.rank == self._shape.rank + 1 and value.shape[0] == n:",
        "        if value.shape.rank == self._shape.rank + 1 and self._keep_sum is None:",
        "tests/test_compression.py -k mid_window",
    ),
    Mutant(
        "benchmark_names_unchecked",
        "distopt/benchmarks/protocol.py",
        "            elif value not in allowed:",
        "            elif False:",
        "tests/test_benchmarks.py -k bad_flag",
    ),
    Mutant(
        "benchmark_failures_exit_0",
        "distopt/benchmarks/protocol.py",
        "    if results:\n        return False",
        "    if True:\n        return False",
        "tests/test_benchmarks.py -k every_run_failing",
    ),
    Mutant(
        "one_replica_compression_silent",
        "distopt/trainer/run.py",
        "    if config.compression:\n",
        "    if False:\n",
        "tests/test_train.py -k on_one_replica",
    ),
    Mutant(
        "run_children_timeout_not_ended",
        "distopt/benchmarks/protocol.py",
        "            _end(procs, grace)\n            break\n",
        "            break\n",
        "tests/test_benchmarks.py -k child_past_the_timeout",
    ),
    Mutant(
        "tvk_batch_unchecked",
        "distopt/benchmarks/trainer_vs_keras.py",
        "    if why:\n        parser.error(",
        "    if False:\n        parser.error(",
        "tests/test_benchmarks.py -k bad_name_or_count",
    ),
    Mutant(
        "tvk_batch_checked_without_mirrored",
        "distopt/benchmarks/protocol.py",
        '    if "mirrored" not in strategies:\n        return None\n',
        "",
        "tests/test_benchmarks.py -k odd_batch",
    ),
    Mutant(
        "keras_fit_failures_exit_0",
        "distopt/benchmarks/keras_fit.py",
        "    return 1 if protocol.no_results(PROG, measured) else 0\n",
        "    return 0\n",
        "tests/test_benchmarks.py -k every_run_failing",
    ),
    Mutant(
        "keras_fit_ratio_without_both",
        "distopt/benchmarks/keras_fit.py",
        "    if len(medians) < len(CONTENDERS):\n",
        "    if not medians:\n",
        "tests/test_benchmarks.py -k every_run_failed",
    ),
    Mutant(
        "tta_tune_file_unchecked",
        "distopt/benchmarks/time_to_accuracy.py",
        "    if why:\n        return cli.error(PROG, why)\n    done = _read_tuned(path)\n",
        "    if False:\n        return cli.error(PROG, why)\n    done = _read_tuned(path)\n",
        "tests/test_benchmarks.py -k tune_checks_its_file",
    ),
    Mutant(
        "tta_tune_append_uncaught",
        "distopt/benchmarks/time_to_accuracy.py",
        "                except OSError as e:  # A full disk",
        "                except ValueError as e:  # A full disk",
        "tests/test_benchmarks.py -k tune_failed_append",
    ),
    Mutant(
        "tta_runs_file_unchecked",
        "distopt/benchmarks/time_to_accuracy.py",
        "    why = _check_append(os.path.join(output_dir, RUNS))\n",
        "    why = None\n",
        "tests/test_benchmarks.py -k checks_runs_jsonl",
    ),
    Mutant(
        "tta_workdir_uncaught",
        "distopt/benchmarks/time_to_accuracy.py",
        '    except OSError as e:\n        return f"cannot create the directory',
        '    except ValueError as e:\n        return f"cannot create the directory',
        "tests/test_benchmarks.py -k runs_as_a_file",
    ),
    Mutant(
        "tta_report_of_no_runs",
        "distopt/benchmarks/time_to_accuracy.py",
        "    if not runs:  # Made before a first run",
        "    if False:  # Made before a first run",
        "tests/test_benchmarks.py -k report_only_of_no_runs",
    ),
    Mutant(
        "log_devices_listed_below_8",
        "distopt/trainer/strategy.py",
        "    if len(devices) <= MAX_LISTED_DEVICES:",
        "    if len(devices) < MAX_LISTED_DEVICES:",
        "tests/test_train.py -k strategy_log_line",
    ),
    Mutant(
        "log_devices_never_summarized",
        "distopt/trainer/strategy.py",
        "MAX_LISTED_DEVICES = 8",
        "MAX_LISTED_DEVICES = 10**9",
        "tests/test_train.py -k strategy_log_line",
    ),
    Mutant(
        "batch_size_before_devices_unchecked",
        "distopt/trainer/strategy.py",
        "    if not batch_splits(config.batch_size, n):",
        "    if False:",
        "tests/test_preflight.py -k virtual_devices_cannot_split",
    ),
    Mutant(
        "cpu_replicas_despite_gpus",
        "distopt/trainer/strategy.py",
        '    if name != "mirrored" or tf.config.list_physical_devices("GPU"):',
        '    if name != "mirrored":',
        "tests/test_preflight.py -k replicas_are_unknown",
    ),
    Mutant(
        "cpu_replicas_of_any_strategy",
        "distopt/trainer/strategy.py",
        '    if name != "mirrored" or tf.config.list_physical_devices("GPU"):',
        '    if tf.config.list_physical_devices("GPU"):',
        "tests/test_preflight.py -k replicas_are_unknown",
    ),
    Mutant(
        "cpu_replicas_default_not_2",
        "distopt/trainer/strategy.py",
        "    return virtual_devices or DEFAULT_CPU_VIRTUAL_DEVICES",
        "    return virtual_devices or 1",
        "tests/test_preflight.py -k virtual_devices_cannot_split",
    ),
    Mutant(
        "tta_runs_dir_unprobed",
        "distopt/benchmarks/time_to_accuracy.py",
        '    return f"cannot write in the directory {workdir}: {why}" if why else None',
        "    return None",
        "tests/test_benchmarks.py -k 'unwritable_runs or runs_on_a_read_only_mount'",
    ),
    Mutant(
        "tta_probes_output_dir_not_runs",
        "distopt/benchmarks/time_to_accuracy.py",
        "    why = output_files.probe(workdir)",
        "    why = output_files.probe(os.path.dirname(workdir))",
        "tests/test_benchmarks.py -k 'unwritable_runs or runs_on_a_read_only_mount'",
    ),
    Mutant(
        "probe_entry_left_behind",
        "distopt/output_files.py",
        "        os.rmdir(entry)\n",
        "        pass\n",
        "tests/test_benchmarks.py -k counts_each_run_once",
    ),
    Mutant(
        "eval_batch_before_devices_unchecked",
        "distopt/trainer/strategy.py",
        "    if config.eval_batch_size and not batch_splits(config.eval_batch_size, n):",
        "    if False:",
        "tests/test_preflight.py -k virtual_devices_cannot_split",
    ),
    Mutant(
        "group_size_before_devices_unchecked",
        "distopt/trainer/strategy.py",
        "    if size is not None and not distribute.group_size_fits(size, n):",
        "    if False:",
        "tests/test_preflight.py -k virtual_devices_cannot_split",
    ),
    Mutant(
        "group_size_rule_reversed",
        "distopt/distribute.py",
        "    return group_size >= 1 and n_local % group_size == 0",
        "    return group_size >= 1 and group_size % n_local == 0",
        "tests/test_preflight.py -k replicas_are_unknown",
    ),
    Mutant(
        "psgd_dependent_column_kept",
        "distopt/compression/powersgd.py",
        "        c = tf.where(norm > tolerance * before, c, tf.zeros_like(c))\n",
        "",
        "tests/test_compression.py -k 'lower_rank or near_dependent'",
    ),
    Mutant(
        "psgd_gram_schmidt_once",
        "distopt/compression/powersgd.py",
        "        for _ in range(2):",
        "        for _ in range(1):",
        "tests/test_compression.py -k near_dependent",
    ),
    Mutant(
        "topk_k_of_the_binary_fraction",
        "distopt/compression/topk.py",
        "math.ceil(fractions.Fraction(repr(self.fraction)) * d)",
        "math.ceil(self.fraction * d)",
        "tests/test_compression.py -k as_written",
    ),
    Mutant(
        "ca_replicas_divide_off",
        "distopt/benchmarks/compression_accuracy.py",
        "        if replicas >= 1 and BATCH_SIZE % replicas:",
        "        if replicas >= 1 and BATCH_SIZE % (replicas + 1):",
        "tests/test_benchmarks.py -k 'bad_name_or_count and compression_accuracy'",
    ),
    Mutant(
        "ca_stop_leaves_workdir",
        "distopt/benchmarks/compression_accuracy.py",
        "    except BaseException:",
        "    except Exception:",
        "tests/test_benchmarks.py -k stopped_removes",
    ),
    Mutant(
        "ca_run_dir_kept",
        "distopt/benchmarks/compression_accuracy.py",
        "    shutil.rmtree(model_dir, ignore_errors=True)",
        "    pass",
        "tests/test_benchmarks.py -k removes_its_run_directories",
    ),
    Mutant(
        "mirrored_batch_check_inverted",
        "distopt/benchmarks/protocol.py",
        '    if "mirrored" not in strategies:',
        '    if "mirrored" in strategies:',
        "tests/test_benchmarks.py -k 'bad_name_or_count or odd_batch'",
    ),
    Mutant(
        "sync_modes_period_1",
        "distopt/benchmarks/sync_modes.py",
        'PERIOD = math.lcm(*(kwargs.get("k", 1) for _, _, kwargs, _ in MODES))',
        'PERIOD = math.lcm(*(kwargs.get("k", 1) for _, _, kwargs, _ in MODES[:1]))',
        "tests/test_benchmarks.py -k 'bad_name_or_count and sync_modes'",
    ),
    Mutant(
        "int64_flag_off_by_one",
        "distopt/trainer/config.py",
        "        if value > INT64_MAX:",
        "        if value > INT64_MAX + 1:",
        "tests/test_preflight.py -k fits_int64",
    ),
    Mutant(
        "tpu_without_tpu_strategy_allowed",
        "distopt/trainer/config.py",
        '    ("tpu", "tpu", "connect to a TPU"),',
        "",
        "tests/test_preflight.py -k out_of_range_number",
    ),
    Mutant(
        "epochs_steps_off_by_one",
        "distopt/trainer/config.py",
        "    if steps > INT64_MAX:",
        "    if steps > INT64_MAX + 1:",
        "tests/test_preflight.py -k epochs_whose_steps",
    ),
    Mutant(
        "eval_bound_ignores_replicas",
        "distopt/trainer/inputs.py",
        "    whole = -(-examples // num_replicas) * num_replicas",
        "    whole = examples",
        "tests/test_preflight.py -k eval_batch_larger",
    ),
    Mutant(
        "preflight_eager_build",
        "distopt/trainer/factories.py",
        "    with tf.Graph().as_default():",
        "    if True:",
        "tests/test_preflight.py -k devices_unmade",
    ),
    Mutant(
        "preflight_arguments_dropped",
        "distopt/train.py",
        "        factories.check_arguments(config)",
        "        pass",
        "tests/test_preflight.py -k checked_first",
    ),
    Mutant(
        "outer_optimizer_unwrapped",
        "distopt/trainer/factories.py",
        'raise ConfigError(f"--sync=diloco --sync_args: outer_{e}") from e',
        "raise",
        "tests/test_preflight.py -k outer_momentum",
    ),
    Mutant(
        "global_clipnorm_unnamed",
        "distopt/trainer/factories.py",
        'FLAG_ARGS = ("global_clipnorm",)',
        "FLAG_ARGS = ()",
        "tests/test_preflight.py -k global_clipnorm",
    ),
    Mutant(
        "lr_float_not_assigned_into_variable",
        "distopt/optimizers/base.py",
        "        if isinstance(current, tf.Variable) and not (",
        "        if False and not (",
        "tests/test_numerics.py -k assigned_into_it",
    ),
    Mutant(
        "lr_schedule_replacement_counted_same",
        "distopt/optimizers/base.py",
        "    if callable(a) or callable(b):\n        return False\n",
        "    if callable(a) or callable(b):\n        return True\n",
        "tests/test_numerics.py -k replaced_after_a_trace",
    ),
    Mutant(
        "rerun_drops_run_training_seconds",
        "distopt/trainer/loop.py",
        '    "run_training_seconds",\n',
        "",
        "tests/test_train.py -k rerun_of_a_finished",
    ),
    Mutant(
        "rerun_drops_threads_at_end",
        "distopt/trainer/loop.py",
        '    "threads_at_end",\n',
        "",
        "tests/test_train.py -k rerun_of_a_finished",
    ),
    Mutant(
        "done_line_uses_kept_rate",
        "distopt/trainer/loop.py",
        "examples_per_second=self.timing.examples_per_second(run.config.batch_size),",
        'examples_per_second=metrics["examples_per_second"],',
        "tests/test_train.py -k rerun_of_a_finished",
    ),
    Mutant(
        "eval_batch_bound_after_training",
        "distopt/trainer/run.py",
        "    inputs.check_eval_batch_size(config, run.source, strategy.num_replicas_in_sync)\n",
        "",
        "tests/test_train.py -k eval_batch_over_data",
    ),
    Mutant(
        "loss_scale_residuals_not_rescaled",
        "distopt/optimizers/base.py",
        "self.compression.rescale(strategy, factor)",
        "self.compression.rescale(strategy, 1.0)",
        "tests/test_compression.py -k dynamic_loss_scale",
    ),
    Mutant(
        "loss_scale_factor_inverted",
        "distopt/transforms.py",
        "return new_scale / scale",
        "return scale / new_scale",
        "tests/test_compression.py -k dynamic_loss_scale",
    ),
    Mutant(
        "powersgd_q_not_rescaled",
        "distopt/compression/powersgd.py",
        "return list(self.q.values())",
        "return []",
        "tests/test_compression.py -k dynamic_loss_scale",
    ),
    Mutant(
        "rescale_cond_inverted",
        "distopt/compression/base.py",
        "dist.cond(tf.not_equal(factor, 1.0), scale, lambda: None)",
        "dist.cond(tf.equal(factor, 1.0), scale, lambda: None)",
        "tests/test_compression.py -k dynamic_loss_scale",
    ),
    Mutant(
        "check_number_takes_str",
        "distopt/checks.py",
        '    if not real:\n        raise ValueError(f"{name}: must be a number, got {value!r}.")',
        '    if not real and not isinstance(value, str):\n        raise ValueError(f"{name}: must be a number, got {value!r}.")',
        "tests/test_compression.py -k bad_argument_is_refused",
    ),
    Mutant(
        "parse_kv_splits_inside_brackets",
        "distopt/trainer/config.py",
        '        if char == "," and depth == 0:',
        '        if char == ",":',
        'tests/test_preflight.py -k "parse_kv or hidden_widths"',
    ),
    Mutant(
        "compressor_not_named",
        "distopt/checks.py",
        "        raise type(e)(f\"{str(e).rstrip('.')} (in {owner}).\") from None",
        "        raise",
        "tests/test_compression.py -k bad_argument_is_refused",
    ),
    Mutant(
        "mlp_widths_unchecked",
        "distopt/models.py",
        '            return tuple(check_int("hidden", w, minimum=1) for w in hidden)',
        "            return tuple(hidden)",
        "tests/test_preflight.py -k bad_list",
    ),
    Mutant(
        "onebit_positional_ignored",
        "distopt/compression/base.py",
        "        if positional:\n",
        "        if False:\n",
        "tests/test_compression.py -k positional",
    ),
    Mutant(
        "eval_no_padding",
        "distopt/data.py",
        "ds = ds.concatenate(padding).take(steps * step_examples)",
        "ds = ds.take(steps * step_examples)",
        "tests/test_evaluation_passes.py tests/test_data.py",
    ),
    Mutant(
        "model_args_change_not_named",
        "distopt/trainer/checkpointing.py",
        "        if put_back := _put_back(model_dir, config):\n            then, now = put_back\n            remedy",
        "        if put_back := None:\n            then, now = put_back\n            remedy",
        "tests/test_train.py -k other_model_args",
    ),
    Mutant(
        "flag_value_list_with_spaces",
        "distopt/trainer/checkpointing.py",
        'return "[" + ",".join(_flag_value(v) for v in value) + "]"',
        "return str(value)",
        "tests/test_train.py -k other_model_args",
    ),
    Mutant(
        "tf_warnings_after_the_error_line",
        "distopt/train.py",
        'std_logging.getLogger("tensorflow").setLevel(std_logging.ERROR)',
        "pass",
        "tests/test_train.py -k killed_on_another",
    ),
    Mutant(
        "synchronize_keeps_the_snapshot",
        "distopt/sync/periodic.py",
        "lambda: self.replica_state.free(strategy, everything),",
        "lambda: None,",
        "tests/test_sync.py -k snapshot",
    ),
    Mutant(
        "snapshot_freed_before_its_check",
        "distopt/sync/snapshots.py",
        "with tf.control_dependencies([checked] if checked is not None else []):",
        "with tf.control_dependencies([]):",
        "tests/test_sync.py -k 'snapshot or restore_replicas'",
    ),
    Mutant(
        "ema_extension_unwarned",
        "distopt/trainer/run.py",
        "_warn_if_weights_are_the_average(run)\n",
        "None\n",
        "tests/test_train.py -k finished_use_ema",
    ),
    Mutant(
        "remote_model_dir_unchecked",
        "distopt/trainer/run.py",
        "    _check_storage(config.model_dir)\n",
        "",
        "tests/test_train.py -k storage_tensorflow",
    ),
    Mutant(
        "dangling_model_dir_link_unchecked",
        "distopt/trainer/paths.py",
        "if os.path.islink(model_dir) and not os.path.exists(model_dir):",
        "if False:",
        "tests/test_preflight.py -k bad_path_is_one_line",
    ),
    Mutant(
        "run_layout_unchecked",
        "distopt/trainer/paths.py",
        "if writes and (misplaced := _misplaced_entry(model_dir)):",
        "if writes and (misplaced := None):",
        "tests/test_preflight.py -k bad_path_is_one_line",
    ),
    Mutant(
        "long_name_unchecked",
        "distopt/trainer/paths.py",
        "if (size := len(os.fsencode(name))) > limit:",
        "if (size := 0) > limit:",
        "tests/test_preflight.py -k bad_path_is_one_line",
    ),
    Mutant(
        "optimizer_error_names_every_argument",
        "distopt/trainer/factories.py",
        "{unknown or sorted(config.optimizer_args)}",
        "{sorted(config.optimizer_args)}",
        "tests/test_preflight.py -k checked_first",
    ),
    Mutant(
        "preempted_notice_not_ignored",
        "distopt/train.py",
        "        stop_notice.ignore()\n        logging.warning",
        "        logging.warning",
        "tests/test_faults.py -k notice_after_the_stop_checkpoint",
    ),
    Mutant(
        "second_ctrl_c_traceback",
        "distopt/train.py",
        "        _interrupted(config, run_dir)",
        "        raise",
        "tests/test_preflight.py -k second_ctrl_c",
    ),
    Mutant(
        "interrupted_run_dir_kept",
        "distopt/train.py",
        "        shutil.rmtree(run_dir.path, ignore_errors=True)",
        "        pass",
        "tests/test_preflight.py -k second_ctrl_c",
    ),
    Mutant(
        "interrupted_runs_root_kept",
        "distopt/train.py",
        '        paths.RunDir("", run_dir.created[:-1]).discard()',
        "        pass",
        "tests/test_preflight.py -k second_ctrl_c",
    ),
    Mutant(
        "empty_model_dir_accepted",
        "distopt/train.py",
        '        if FLAGS["model_dir"].present and not FLAGS.model_dir:',
        "        if False:",
        "tests/test_preflight.py -k empty_dir",
    ),
    Mutant(
        "flagfile_error_raw",
        "distopt/train.py",
        '            e = f"--flagfile={cause.filename}: cannot open it ({cause.strerror})"',
        "            pass",
        "tests/test_preflight.py -k no_flagfile",
    ),
    Mutant(
        "unused_values_not_silenced",
        "distopt/trainer/checkpointing.py",
        "    status.expect_partial()\n",
        "",
        "tests/test_train.py -k drops_optimizer_state",
    ),
    Mutant(
        "unused_values_not_warned",
        "distopt/trainer/checkpointing.py",
        "        _warn_unused_values(checkpoint, path, model_dir, config, e)\n",
        "        pass\n",
        "tests/test_train.py -k drops_optimizer_state",
    ),
    Mutant(
        "unused_values_named_wrong",
        "distopt/trainer/checkpointing.py",
        "            if child not in matched:\n",
        "            if child in matched:\n",
        "tests/test_train.py -k drops_optimizer_state",
    ),
    Mutant(
        "unused_values_no_flag_to_put_back",
        "distopt/trainer/checkpointing.py",
        "Rerun with {then} to keep them",
        "Rerun to keep them",
        "tests/test_train.py -k drops_optimizer_state",
    ),
    Mutant(
        "unused_values_warned_always",
        "distopt/trainer/checkpointing.py",
        "        status.assert_consumed()\n",
        "        status.assert_consumed()\n        raise AssertionError('mutant')\n",
        "tests/test_train.py -k ordinary_resume_warns",
    ),
    Mutant(
        "missing_run_config_unsaid",
        "distopt/trainer/checkpointing.py",
        "        if latest and not tf.io.gfile.exists(path):",
        "        if False:",
        "tests/test_train.py -k without_run_config",
    ),
    Mutant(
        "explicit_stop_and_skip_accepted",
        "distopt/train.py",
        '        if FLAGS.skip_nonfinite and given and given != "skip":',
        "        if False:",
        "tests/test_preflight.py -k stop_and_skip",
    ),
    Mutant(
        "startup_output_replayed_on_ctrl_c",
        "distopt/quiet.py",
        "    except KeyboardInterrupt:\n        raise",
        "    except ZeroDivisionError:\n        raise",
        "tests/test_quiet.py -k ctrl_c",
    ),
    Mutant(
        "batch_preflight_not_called",
        "distopt/train.py",
        "        inputs.check_batch_before_data(config)\n",
        "",
        "tests/test_preflight.py -k bundled_mnist",
    ),
    Mutant(
        "batch_preflight_off_by_one",
        "distopt/trainer/inputs.py",
        "config.batch_size > BUNDLED_TRAIN_EXAMPLES",
        "config.batch_size >= BUNDLED_TRAIN_EXAMPLES",
        "tests/test_preflight.py -k bundled_mnist",
    ),
    Mutant(
        "batch_preflight_ignores_drop_remainder",
        "distopt/trainer/inputs.py",
        "        and config.drop_remainder\n",
        "",
        "tests/test_preflight.py -k bundled_mnist",
    ),
    Mutant(
        "batch_preflight_ignores_input",
        "distopt/trainer/inputs.py",
        'and config.input != "dataset"',
        "and True",
        "tests/test_preflight.py -k bundled_mnist",
    ),
    Mutant(
        "batch_preflight_skips_mirrored",
        "distopt/trainer/inputs.py",
        '("default", "one_device", "mirrored")',
        '("default", "one_device")',
        "tests/test_preflight.py -k bundled_mnist",
    ),
    Mutant(
        "batch_preflight_wrong_size",
        "distopt/trainer/inputs.py",
        "BUNDLED_TRAIN_EXAMPLES = 60000",
        "BUNDLED_TRAIN_EXAMPLES = 60001",
        "tests/test_preflight.py -k bundled_mnist",
    ),
    Mutant(
        "step_rate_zero",
        "distopt/trainer/summaries.py",
        "if self.steps else None",
        "if self.steps else 0.0",
        "tests/test_train.py -k no_timed_step",
    ),
    Mutant(
        "step_rate_scalar_zero",
        "distopt/trainer/summaries.py",
        '        if rate is not None:  # No 0 where nothing was timed.\n            scalars["examples_per_second"] = rate\n',
        '        scalars["examples_per_second"] = rate or 0.0\n',
        "tests/test_train.py -k no_timed_step",
    ),
    Mutant(
        "pipeline_batch_unchecked",
        "distopt/trainer/inputs.py",
        "    _check_pipeline_batch(strategy, source, config.batch_size, drop)\n",
        "",
        "tests/test_train.py -k pipelines_shard",
    ),
    Mutant(
        "eta_zero_before_any_timed_step",
        "distopt/trainer/summaries.py",
        "(None if left else 0.0)",
        "0.0",
        "tests/test_train.py -k longer_run_says",
    ),
    Mutant(
        "unread_flag_default_refused",
        "distopt/trainer/config.py",
        "if value != getattr(defaults, flag) and actual not in values:",
        "if actual not in values:",
        "tests/test_preflight.py -k taken_where",
    ),
    Mutant(
        "unread_flag_ignores_skip_nonfinite",
        "distopt/trainer/config.py",
        'readers = {"on_nonfinite": nonfinite_policy(config)}',
        "readers = {}",
        "tests/test_preflight.py -k taken_where",
    ),
    Mutant(
        "unread_decay_rate_allowed",
        "distopt/trainer/config.py",
        '("decay_rate", "lr_schedule", ("exponential",)),',
        "",
        "tests/test_preflight.py -k taken_where",
    ),
    Mutant(
        "unread_sync_period_allowed",
        "distopt/trainer/config.py",
        'if config.sync == "every_step" and config.sync_period != defaults.sync_period:',
        "if False:",
        "tests/test_preflight.py -k 'taken_where or out_of_range'",
    ),
    Mutant(
        "unread_flag_check_not_called",
        "distopt/trainer/config.py",
        "    _check_flags_that_would_do_nothing(config)\n",
        "",
        "tests/test_preflight.py -k out_of_range",
    ),
    Mutant(
        "sharding_on_one_replica_silent",
        "distopt/trainer/run.py",
        "    if config.shard_optimizer_state:\n",
        "    if False:\n",
        "tests/test_train.py -k on_one_replica",
    ),
    Mutant(
        "all_none_gradients_accepted",
        "distopt/optimizers/base.py",
        "if all_variables and not variables:",
        "if False:",
        "tests/test_errors.py -k all_none",
    ),
    Mutant(
        "diloco_ef_warning_ignores_outer_momentum",
        "distopt/trainer/run.py",
        'or not config.sync_args.get("outer_momentum", factories.OUTER_MOMENTUM)',
        "or False",
        "tests/test_train.py -k diloco_with_error",
    ),
    Mutant(
        "diloco_ef_warning_ignores_decay",
        "distopt/trainer/run.py",
        'or "error_feedback_decay" in args',
        "or False",
        "tests/test_train.py -k diloco_with_error",
    ),
    Mutant(
        "diloco_ef_warning_not_called",
        "distopt/trainer/run.py",
        "    warn_if_error_feedback_meets_outer_momentum(config)\n",
        "",
        "tests/test_train.py -k diloco_with_error",
    ),
    Mutant(
        "counter_array_scalar",
        "distopt/counter.py",
        "return np.asarray(self.variable.numpy(), dtype=dtype)",
        "return self.variable.numpy()",
        "tests/test_numerics.py -k counters_read",
    ),
    Mutant(
        "counter_no_cast",
        "distopt/counter.py",
        "        tensor = tf.cast(tensor, dtype)",
        "        tensor = tensor",
        "tests/test_numerics.py -k counters_read",
    ),
    Mutant(
        "keras_outside_scope_allowed",
        "distopt/keras.py",
        "and tf.distribute.get_strategy() is not self._distribution_strategy",
        "and False",
        "tests/test_keras_wrap.py -k outside_the_scope",
    ),
    Mutant(
        "keras_unknown_variable_unnamed",
        "distopt/keras.py",
        "f\"{argument}: {unknown[:4]}{' ...' if len(unknown) > 4 else ''} \"",
        'f"{argument}: "',
        "tests/test_keras_wrap.py -k outside_the_scope",
    ),
    Mutant(
        "sync_callback_own_back_at_test_end_in_fit",
        "distopt/keras.py",
        "        if not self._fitting:\n",
        "        if True:\n",
        "tests/test_keras_wrap.py -k early_stopping",
    ),
    Mutant(
        "sync_callback_ignores_replaced_weights",
        "distopt/keras.py",
        "if unless_replaced and not self._average_in_place():",
        "if False:",
        "tests/test_keras_wrap.py -k early_stopping",
    ),
    Mutant(
        "save_snapshots_the_average",
        "distopt/keras.py",
        "        if own is None:\n            yield",
        "        if True:\n            yield",
        "tests/test_keras_wrap.py -k validation_with_sync",
    ),
    Mutant(
        "own_not_back_at_epoch_begin",
        "distopt/keras.py",
        "    def on_epoch_begin(self, epoch, logs=None):\n        self._own_back()",
        "    def on_epoch_begin(self, epoch, logs=None):\n        pass",
        "tests/test_keras_wrap.py -k validation_with_sync",
    ),
    Mutant(
        "keras_save_keeps_the_snapshot",
        "distopt/keras.py",
        "            self._inner.restore_replicas(variables)\n",
        "            pass\n",
        "tests/test_keras_wrap.py -k early_stopping",
    ),
    Mutant(
        "sync_callback_fit_never_ends",
        "distopt/keras.py",
        "        super().set_model(model)\n        self._fitting = False",
        "        super().set_model(model)",
        "tests/test_keras_wrap.py -k fit_that_raised",
    ),
    Mutant(
        "residuals_restart_at_zero",
        "distopt/distribute.py",
        "            share = total / tf.cast(n, total.dtype)",
        "            share = total * 0.0 if self._on_mismatch else total / n",
        "tests/test_compression.py -k 'residuals_sum or default_strategy'",
    ),
    Mutant(
        "residuals_spread_unannounced",
        "distopt/compression/base.py",
        "                            on_mismatch=self._note_spread,",
        "                            on_mismatch=None,",
        "tests/test_compression.py -k 'residuals_sum or default_strategy'",
    ),
    Mutant(
        "int64_arguments_unbounded",
        "distopt/checks.py",
        "    if value > maximum:",
        "    if value > maximum + 1:",
        "tests/test_errors.py -k beyond_int64",
    ),
    Mutant(
        "logical_state_not_a_tensor",
        "distopt/distribute.py",
        "tf.register_tensor_conversion_function(LogicalState, _logical_to_tensor)",
        "pass",
        "tests/test_sharded.py -k reads_as",
    ),
    Mutant(
        "keras_unbuilt_save_unloadable",
        "distopt/keras.py",
        "        state = self._state() if keys else []",
        "        state = self._state()",
        "tests/test_keras_wrap.py -k saved_before_its_first",
    ),
    Mutant(
        "outer_options_ignored",
        "distopt/sync/periodic.py",
        "    if unused:",
        "    if False:",
        "tests/test_sync.py -k outer_optimizer_option",
    ),
    Mutant(
        "onebit_unknown_keyword_unnamed",
        "distopt/compression/base.py",
        "        if unknown:\n",
        "        if False:\n",
        "tests/test_compression.py -k onebit_refuses",
    ),
    Mutant(
        "accumulators_shared_out_as_sums",
        "distopt/sync/accumulate.py",
        '        acc_share = "mean" if aggregation == "mean" else "sum"',
        '        acc_share = "sum"',
        "tests/test_sync.py -k another_replica_count",
    ),
    Mutant(
        "micro_step_counts_shared_out_as_sums",
        "distopt/sync/accumulate.py",
        '        weight_share = "sum" if aggregation == "weighted_mean" else "mean"',
        '        weight_share = "sum"',
        "tests/test_sync.py -k another_replica_count",
    ),
    Mutant(
        "determinism_left_on",
        "distopt/distribute.py",
        "        elif not was_on:\n            switch[1]()",
        "        elif False:\n            switch[1]()",
        "tests/test_train.py -k deterministic_is_for",
    ),
    Mutant(
        "trainer_eval_retracing_shown",
        "distopt/trainer/run.py",
        "            step_lib.make_eval_loop,\n",
        "",
        "tests/test_train.py -k retracing_warning",
    ),
    Mutant(
        "retracing_filter_hides_nothing",
        "distopt/quiet.py",
        '        return not ("retracing" in message and self._made_there.search(message))',
        "        return True",
        "tests/test_quiet.py -k retracing_of_made",
    ),
]


def _pytest(tree: str, args: list[str]) -> subprocess.CompletedProcess:
    """`python -m pytest -q args` in the worktree `tree`, importing its code."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=tree,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": tree},
        check=False,
    )


def run(mutant: Mutant, tree: str) -> tuple[str, float]:
    """Applies `mutant` in `tree`, runs its tests; returns (verdict, seconds)."""
    subprocess.run(["git", "checkout", "-q", "."], cwd=tree, check=True)
    path = os.path.join(tree, mutant.path)
    with open(path) as f:
        text = f.read()
    if text.count(mutant.old) < 1:
        return "STALE (the code it mutates changed)", 0.0
    with open(path, "w") as f:
        f.write(text.replace(mutant.old, mutant.new, 1))
    start = time.perf_counter()
    proc = _pytest(tree, ["-x", *shlex.split(mutant.tests)])
    seconds = time.perf_counter() - start
    if proc.returncode == 0:
        verdict = "equivalent" if mutant.name in EQUIVALENT else "SURVIVED"
    elif "failed" in proc.stdout:
        verdict = "caught"
    else:
        verdict = f"ERROR (pytest exit {proc.returncode})"
    return verdict, seconds


def baseline(chosen: list[Mutant], tree: str) -> bool:
    """Runs the chosen mutants' test modules once, unmutated; True if they pass."""
    modules = sorted(
        {a for m in chosen for a in shlex.split(m.tests) if a.endswith(".py")}
    )
    proc = _pytest(tree, modules)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], file=sys.stderr)
    return proc.returncode == 0


def main(names: list[str]) -> int:
    seen = [m.name for m in MUTANTS]
    repeated = sorted({n for n in seen if seen.count(n) > 1})
    if repeated:
        print(f"mutation_sweep: error: repeated names {repeated}", file=sys.stderr)
        return 2
    chosen = [m for m in MUTANTS if not names or m.name in names]
    unknown = set(names) - {m.name for m in MUTANTS}
    if unknown:
        print(
            f"mutation_sweep: error: unknown mutants {sorted(unknown)}", file=sys.stderr
        )
        return 2
    holes = 0
    with tempfile.TemporaryDirectory() as scratch:
        tree = os.path.join(scratch, "tree")
        subprocess.run(
            ["git", "worktree", "add", "-q", "--detach", tree, "HEAD"],
            cwd=REPO,
            check=True,
        )
        try:
            print(f"baseline: {len(chosen)} mutants' modules, unmutated...", flush=True)
            if not baseline(chosen, tree):
                print("mutation_sweep: error: the baseline fails; fix it first")
                return 2
            for i, mutant in enumerate(chosen, 1):
                verdict, seconds = run(mutant, tree)
                holes += verdict not in ("caught", "equivalent")
                print(
                    f"[{i}/{len(chosen)}] {mutant.name}: {verdict} ({seconds:.0f} s)",
                    flush=True,
                )
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", tree], cwd=REPO, check=False
            )
    print(f"{len(chosen) - holes}/{len(chosen)} caught or equivalent")
    return 1 if holes else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
