"""The convergence study of TensorFlow's Core optimizers guide, as a tool.

    python -m distopt.compare --optimizers=gradient_descent,momentum,adam \\
        --learning_rates=0.001,0.01,0.1 --output_dir=DIR

For every optimizer and learning rate, a parameter starts at the problem's
start point and takes up to `--max_iters` steps of a real distopt optimizer
(`apply_gradients` with the problem's gradient, or `minimize` with its loss
for optimizers that evaluate the loss themselves, such as `sam` and `heun`).
Each run ends with one of three outcomes, as in the guide:

* "converged": the parameter did not change in one step (`iterations` is
  that step);
* "exploded": a non-finite gradient appeared (`iterations` is the step
  whose gradient it was; the final x is the point where it was evaluated);
* "exceeded": `--max_iters` steps were taken.

The default problem is the guide's quartic L(x) = 2x^4 + 3x^3 + 2 from the
poor start x = 2 (saddle point at 0, global minimum at x* = -9/8); see
`distopt.problems` for `rosenbrock` and `noisy_quadratic`.

Optimizers are given as a comma-separated list of registered names
(`distopt.optimizers.names()`), each optionally followed by `:` and
hyperparameters `key=value`; further `key=value` items, until the next name,
belong to the same optimizer:

    --optimizers=momentum:momentum=0.5,nesterov=true,adam:beta_1=0.8
    --optimizers=gradient_descent,sam:base_optimizer=momentum,rho=0.1,heun

Values are read as Python literals where possible (numbers, True/False or
true/false, None) and as strings otherwise. The learning rate comes from
`--learning_rates`; for `sam` it is the base optimizer's.

The tool prints a table (optimizer, learning rate, outcome, iterations, final
x, final loss). With `--output_dir` it writes `results.json`, a list with one
entry per run: `optimizer`, `learning_rate`, `outcome`, `iterations`,
`x_final` (a number for a 1-D problem, else a list), `loss_final`,
`distance_to_minimum`, `replicas`, `replicas_identical` and a few more;
non-finite numbers are written as null. With matplotlib installed
(`pip install distopt[viz]`) it also writes PNG figures there:
`loss_and_gradient.png` (the problem, its critical points marked),
`paths_<optimizer>.png` per optimizer (every learning rate's parameter path
over a heat map of the log loss against iteration and x, or over the contour
plot for a 2-D problem) and `loss_curves.png` (L - L* along every run).

`--strategy=mirrored --virtual_devices=N` runs every step inside
`strategy.run` on N replicas (virtual CPUs) and checks that every replica's
copy of the parameter follows the same path.

The whole loop of one run is one `tf.function` with a `tf.while_loop` that
stops at the outcome, so a default run takes seconds, not minutes.

This module is the command line; the study is `distopt.study` and the
figures `distopt.study_figures`. `--help` and flag errors come before
TensorFlow's import, at once.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import sys
import time

from absl import flags

from distopt import cli, output_files, quiet
from distopt.trainer import paths as trainer_paths

#: The registered problems (`distopt.problems.names()`, which needs
#: TensorFlow; tests/test_compare.py checks that they agree).
PROBLEMS = ("noisy_quadratic", "quartic", "rosenbrock")
# The study's step counter is an int32 in its tf.while_loop.
_MAX_ITERS = 2**31 - 2

# Flags live in their own FlagValues, not absl's global FLAGS: the tool is
# importable (tests, notebooks) next to other absl programs without clashing.
_FLAGS = flags.FlagValues()
flags.DEFINE_string(
    "optimizers",
    "gradient_descent,momentum,adam",
    "Comma-separated registered optimizer names, each optionally with "
    "hyperparameters: NAME[:KEY=VALUE[,KEY=VALUE...]], e.g. "
    "'momentum:momentum=0.5,nesterov=true,adam:beta_1=0.8'.",
    flag_values=_FLAGS,
)
flags.DEFINE_list(
    "learning_rates",
    ["0.001", "0.01", "0.1"],
    "Comma-separated positive learning rates; every optimizer runs with each.",
    flag_values=_FLAGS,
)
flags.DEFINE_string(
    "problem",
    "quartic",
    "The test problem: " + ", ".join(PROBLEMS) + ".",
    flag_values=_FLAGS,
)
flags.DEFINE_integer(
    "max_iters",
    2000,
    "Steps after which a run that neither converged nor exploded stops ('exceeded').",
    flag_values=_FLAGS,
)
flags.DEFINE_string(
    "output_dir",
    None,
    "Directory for results.json and the PNG figures (created if missing). "
    "Without it only the table is printed.",
    flag_values=_FLAGS,
)
flags.DEFINE_string(
    "strategy",
    "default",
    "'default' (no distribution) or 'mirrored' (every step inside strategy.run "
    "on --virtual_devices replicas).",
    flag_values=_FLAGS,
)
flags.DEFINE_integer(
    "virtual_devices",
    2,
    "Replicas for --strategy=mirrored: the CPU is split into this many logical "
    "devices.",
    flag_values=_FLAGS,
)
flags.DEFINE_float(
    "noise_scale",
    0.5,
    "Standard deviation of the gradient noise of --problem=noisy_quadratic.",
    flag_values=_FLAGS,
)
flags.DEFINE_integer(
    "seed", 0, "Noise seed of --problem=noisy_quadratic.", flag_values=_FLAGS
)
flags.DEFINE_integer(
    "verbosity",
    0,
    "1 or more: also TensorFlow's start-up output, INFO lines and retracing warnings.",
    flag_values=_FLAGS,
)
flags.DEFINE_boolean(
    "figures",
    True,
    "Write PNG figures to --output_dir (needs matplotlib); --nofigures skips them.",
    flag_values=_FLAGS,
)

VIZ_HINT = (
    "Figures skipped: matplotlib is not installed; `pip install distopt[viz]` "
    "to get them."
)


# --- Optimizer specifications --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """A registered optimizer name with fixed hyperparameters."""

    name: str
    hyperparameters: dict = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        """`name`, or `name(key=value, ...)` when hyperparameters are set."""
        if not self.hyperparameters:
            return self.name
        args = ", ".join(f"{k}={v}" for k, v in self.hyperparameters.items())
        return f"{self.name}({args})"

    def build(self, learning_rate: float):
        """A fresh optimizer with this learning rate."""
        from distopt import optimizers

        return optimizers.get(
            self.name, learning_rate=learning_rate, **self.hyperparameters
        )


def parse_optimizers(text: str) -> list[OptimizerSpec]:
    """Parses `--optimizers` (see the module docstring for the syntax).

    Raises:
        ValueError: for an unknown name (listing the valid ones), a malformed
            item, or `learning_rate` among the hyperparameters.
    """
    from distopt import optimizers  # the registry; imports TensorFlow

    specs: list[tuple[str, dict]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if ":" in item:
            name, _, rest = item.partition(":")
            specs.append((name.strip(), {}))
            if rest.strip():
                _add_hyperparameter(specs[-1], rest.strip())
        elif "=" in item:
            if not specs:
                raise ValueError(
                    f"optimizers: {item!r} comes before any optimizer name; write "
                    "NAME:KEY=VALUE."
                )
            _add_hyperparameter(specs[-1], item)
        else:
            specs.append((item, {}))
    if not specs:
        raise ValueError(
            "optimizers: give at least one; valid names: "
            f"{', '.join(optimizers.names())}."
        )
    valid = optimizers.names()
    for name, _ in specs:
        if name not in valid:
            raise ValueError(
                f"optimizers: unknown optimizer {name!r}; valid names: "
                f"{', '.join(valid)}."
            )
    return [OptimizerSpec(name, hp) for name, hp in specs]


def _add_hyperparameter(spec, item):
    name, hp = spec
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise ValueError(
            f"optimizers: malformed hyperparameter {item!r} of {name!r}; write "
            "KEY=VALUE."
        )
    if key == "learning_rate":
        raise ValueError(
            f"optimizers: set the learning rate of {name!r} with --learning_rates."
        )
    hp[key] = _parse_value(value.strip())


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_learning_rates(values) -> list[float]:
    """Floats from `--learning_rates`; each must be finite and positive."""
    rates = []
    for v in values:
        try:
            lr = float(v)
        except (TypeError, ValueError):
            raise ValueError(
                f"learning_rates: {v!r} is not a number; give positive numbers, "
                "e.g. 0.001,0.01,0.1."
            ) from None
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"learning_rates: must be positive and finite, got {v!r}.")
        rates.append(lr)
    if not rates:
        raise ValueError("learning_rates: give at least one positive number.")
    return rates


# --- Command line ------------------------------------------------------------------


def mirrored_strategy(num_replicas: int):
    """A MirroredStrategy over `num_replicas` logical CPUs.

    Splits the CPU into logical devices when TensorFlow has not initialised
    its devices yet; otherwise uses the logical CPUs that exist.
    """
    from distopt import distribute as dist

    if num_replicas < 1:
        raise ValueError(f"virtual_devices: must be >= 1, got {num_replicas}.")
    try:
        devices = dist.logical_cpu_devices(num_replicas)
    except ValueError as e:
        raise ValueError(f"virtual_devices: {e}") from None
    return dist.make_strategy("mirrored", devices=devices)


def main(argv=None) -> int:
    """Runs the tool with command-line `argv`; returns the exit status."""
    status = cli.parse("distopt.compare", __doc__, _FLAGS, argv)
    if status is not None:
        return status
    # TensorFlow's C++ start-up block is held back (--verbosity=1 prints it).
    quiet.import_tensorflow()
    quiet.configure_logging(_FLAGS.verbosity)
    try:
        return _run(_FLAGS)
    except ValueError as e:
        return cli.error("distopt.compare", e)
    except OSError as e:  # Writing the results (a full disk): one line.
        cli.error("distopt.compare", output_files.why(e))
        return 1
    except KeyboardInterrupt:
        print("distopt.compare: interrupted", file=sys.stderr)
        return 130


def _check_flags_apply(f) -> None:
    """A flag given for a setting it does not change is refused (it was ignored)."""
    for name, needs, applies in [
        ("virtual_devices", "--strategy=mirrored", f.strategy == "mirrored"),
        ("noise_scale", "--problem=noisy_quadratic", f.problem == "noisy_quadratic"),
        ("seed", "--problem=noisy_quadratic", f.problem == "noisy_quadratic"),
    ]:
        if f[name].present and not applies:
            raise ValueError(f"{name}: applies only with {needs}.")


def _run(f) -> int:
    from distopt import problems as problems_lib
    from distopt import study, study_figures

    _check_flags_apply(f)
    problem_kwargs = {}
    if f.problem == "noisy_quadratic":
        problem_kwargs = {"noise_scale": f.noise_scale, "seed": f.seed}
    problem = problems_lib.get(f.problem, **problem_kwargs)
    specs = parse_optimizers(f.optimizers)
    rates = parse_learning_rates(f.learning_rates)
    if not 1 <= f.max_iters <= _MAX_ITERS:
        raise ValueError(f"max_iters: must be in [1, {_MAX_ITERS}], got {f.max_iters}.")
    if f.output_dir:
        # Checked before the study, not after it: its results would be lost.
        problems = trainer_paths.check_model_dir(f.output_dir, flag_name="output_dir")
        if problems:
            raise ValueError(problems[0].removeprefix("--"))
    if f.strategy not in ("default", "mirrored"):
        raise ValueError(
            f"strategy: unknown {f.strategy!r}; valid names: default, mirrored."
        )
    strategy = (
        mirrored_strategy(f.virtual_devices) if f.strategy == "mirrored" else None
    )
    study.check_specs(specs, rates[0])

    t0 = time.perf_counter()
    results = study.run_study(
        problem, specs, rates, max_iters=f.max_iters, strategy=strategy
    )
    elapsed = time.perf_counter() - t0
    print(
        f"Problem: {problem.name}, {problem.title}; start x = {study.format_x(problem.start)}, "
        f"minimum x* = {study.format_x(problem.minimum)}, L* = {problem.min_loss:.6g}"
    )
    print(study.format_table(results))
    status = 0
    replicas = results[0].replicas
    if replicas > 1:
        diverged = [
            f"{r.optimizer} lr={r.learning_rate:g}"
            for r in results
            if not r.replicas_identical
        ]
        if diverged:
            # A library bug, not a property of the optimizer: fail the run.
            print(f"Replicas DIVERGED in: {', '.join(diverged)}")
            status = 1
        else:
            print(
                f"Mirrored over {replicas} replicas: every replica's path is "
                f"identical in all {len(results)} runs."
            )
    print(f"{len(results)} runs in {elapsed:.1f} s.")
    if not f.output_dir:
        print("Pass --output_dir=DIR for results.json and the figures.")
    else:
        print(f"Wrote {study.write_results(results, problem, f.output_dir)}")
        if f.figures:
            try:
                paths = study_figures.make_figures(problem, results, f.output_dir)
            except ImportError:
                print(VIZ_HINT)
            else:
                print(f"Wrote {len(paths)} figures to {f.output_dir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
