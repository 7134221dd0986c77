"""`python -m distopt.compare` and `distopt.problems`.

Outcomes are checked against an independent NumPy re-implementation of the
guide's convergence loop, in float32 like the tool, so even the iteration of
convergence and the final x must agree exactly.
"""

import json
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import mirrored, run_python

from distopt import compare, study
from distopt import problems as problems_lib

F32 = np.float32


# --- The independent reference --------------------------------------------------


def numpy_convergence_test(lr, momentum=None, nesterov=False, max_iters=2000):
    """The guide's loop on L(x) = 2x^4 + 3x^3 + 2 from x = 2, in float32.

    Gradient descent: x <- x - lr g. Momentum (Keras SGD): m <- mu m - lr g;
    x <- x + m, or x + mu m - lr g with Nesterov.
    """
    x, m, lr = F32(2.0), F32(0.0), F32(lr)
    for it in range(1, max_iters + 1):
        with np.errstate(over="ignore", invalid="ignore"):
            g = F32(8) * x**3 + F32(9) * x**2
            if not np.isfinite(g):
                return "exploded", it, x
            old = x
            if momentum is None:
                x = x - lr * g
            else:
                m = m * F32(momentum) - g * lr
                x = x + (m * F32(momentum) - g * lr if nesterov else m)
        if x == old:
            return "converged", it, x
    return "exceeded", max_iters, x


def _run_cli(*args):
    return compare.main(["distopt.compare", *args])


def _quiet_matplotlib_import():
    pytest.importorskip("matplotlib")
    from matplotlib import image

    return image


# --- The convergence study ---------------------------------------------------------


def test_cli_matches_numpy_reference_and_writes_figures(tmp_path, capsys, caplog):
    out = tmp_path / "study"
    rc = _run_cli(
        "--optimizers=gradient_descent,momentum,momentum:momentum=0.5,nesterov=true",
        "--learning_rates=0.001,0.01,0.1",
        f"--output_dir={out}",
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "optimizer" in printed and "final loss" in printed
    # 9 studies trace 9 functions: TensorFlow warns about retracing, which
    # only --verbosity=1 shows.
    assert "retracing" not in caplog.text

    results = json.loads((out / "results.json").read_text())
    assert len(results) == 9
    expected = {}
    for lr in (0.001, 0.01, 0.1):
        expected["gradient_descent", lr] = numpy_convergence_test(lr)
        expected["momentum", lr] = numpy_convergence_test(lr, momentum=0.9)
        expected["momentum(momentum=0.5, nesterov=True)", lr] = numpy_convergence_test(
            lr, momentum=0.5, nesterov=True
        )
    # The reference covers all three outcomes, so each is checked.
    assert {o for o, _, _ in expected.values()} == {"converged", "exploded", "exceeded"}
    for r in results:
        outcome, iterations, x_final = expected[r["optimizer"], r["learning_rate"]]
        assert (r["outcome"], r["iterations"]) == (outcome, iterations), r
        assert F32(r["x_final"]) == x_final, r
        assert r["replicas"] == 1 and r["replicas_identical"] is True
        # The table shows the same run.
        assert f"{r['learning_rate']:g}" in printed and outcome in printed

    image = _quiet_matplotlib_import()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "loss_and_gradient.png",
        "loss_curves.png",
        "paths_gradient_descent.png",
        "paths_momentum.png",
        "paths_momentum_momentum=0.5_nesterov=True.png",
    ]
    for name in pngs:
        _assert_nontrivial_png(image, out / name)


def _assert_nontrivial_png(image, path):
    assert path.stat().st_size > 20_000, path
    pixels = image.imread(str(path))[..., :3]
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 400, path
    assert pixels.std() > 0.1, path  # not a blank canvas
    rgb = (pixels.reshape(-1, 3) * 255).astype(np.uint8).astype(np.uint32)
    # The distinct colours, each packed into one integer (r, g, b -> 0xRRGGBB,
    # one to one): np.unique(axis=0) on the rows counts the same, ~50x slower.
    colors = np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2])
    assert len(colors) > 200, path  # heat maps and lines, not a few flat fills


def test_2d_problem_figures(tmp_path):
    out = tmp_path / "rosen"
    rc = _run_cli(
        "--problem=rosenbrock",
        "--optimizers=gradient_descent",
        "--learning_rates=0.001,0.01",
        "--max_iters=200",
        f"--output_dir={out}",
    )
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["outcome"] for r in results] == ["exceeded", "exploded"]
    assert len(results[0]["x_final"]) == 2
    image = _quiet_matplotlib_import()
    for name in ("loss_and_gradient.png", "paths_gradient_descent.png"):
        _assert_nontrivial_png(image, out / name)


def test_without_matplotlib_table_and_hint(tmp_path, capsys, monkeypatch):
    # A None entry makes `import matplotlib` raise ImportError.
    for mod in [
        m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")
    ]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "nomat"
    rc = _run_cli(
        "--optimizers=gradient_descent", "--learning_rates=0.1", f"--output_dir={out}"
    )
    assert rc == 0
    printed = capsys.readouterr().out.splitlines()
    assert any(
        line.startswith("gradient_descent") and "exploded" in line for line in printed
    )
    hints = [line for line in printed if "pip install distopt[viz]" in line]
    assert hints == [compare.VIZ_HINT]
    assert (out / "results.json").exists()
    assert not list(out.glob("*.png"))


def test_mirrored_paths_identical_to_single_device():
    problem = problems_lib.get("quartic")
    specs = compare.parse_optimizers(
        "gradient_descent,momentum,sam:base_optimizer=gradient_descent,heun"
    )
    kwargs = {"max_iters": 300}
    single = study.run_study(problem, specs, [0.01, 0.1], **kwargs)
    multi = study.run_study(problem, specs, [0.01, 0.1], strategy=mirrored(2), **kwargs)
    for s, m in zip(single, multi):
        assert m.replicas == 2 and m.replicas_identical, m.optimizer
        assert (m.outcome, m.iterations) == (s.outcome, s.iterations)
        np.testing.assert_array_equal(m.path, s.path)


def test_cli_mirrored_reports_identical_replicas(tmp_path, capsys):
    rc = _run_cli(
        "--strategy=mirrored",
        "--virtual_devices=2",
        "--optimizers=momentum",
        "--learning_rates=0.01",
        f"--output_dir={tmp_path}",
        "--nofigures",
    )
    assert rc == 0
    assert "every replica's path is identical" in capsys.readouterr().out
    (entry,) = json.loads((tmp_path / "results.json").read_text())
    assert entry["replicas"] == 2 and entry["replicas_identical"] is True
    want = numpy_convergence_test(0.01, momentum=0.9)
    assert (entry["outcome"], entry["iterations"], F32(entry["x_final"])) == want


def test_noisy_quadratic_is_seeded():
    problem = problems_lib.get("noisy_quadratic", noise_scale=0.5, seed=3)
    specs = compare.parse_optimizers("gradient_descent")
    a, b = (study.run_study(problem, specs, [0.05], max_iters=50)[0] for _ in range(2))
    np.testing.assert_array_equal(a.path, b.path)
    assert a.outcome == "exceeded" and a.iterations == 50


# --- Bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--optimizers=sgd_typo"],
            "unknown optimizer 'sgd_typo'; valid names: adagrad",
        ),
        (
            ["--problem=himmelblau"],
            "unknown 'himmelblau'; valid names: noisy_quadratic",
        ),
        (["--learning_rates=0.1,-0.01"], "must be positive"),
        (["--learning_rates=0"], "must be positive"),
        (["--learning_rates=fast"], "'fast' is not a number"),
        (["--optimizers=momentum:bogus=1"], "bogus"),
        (["--optimizers=adam:learning_rate=1"], "--learning_rates"),
        (["--optimizers=beta_1=0.5"], "before any optimizer name"),
        (["--strategy=tpu"], "valid names: default, mirrored"),
        (["--max_iters=0"], "max_iters"),
        # A TensorFlow int32 error after the start-up work.
        (["--max_iters=3000000000"], "max_iters: must be in [1, 2147483646]"),
        # Each was ignored in silence.
        (["--virtual_devices=4"], "virtual_devices: applies only with --strategy="),
        (["--noise_scale=1"], "noise_scale: applies only with --problem=noisy_"),
        (["--problem=rosenbrock", "--seed=1"], "seed: applies only with --problem"),
        (
            ["--problem=noisy_quadratic", "--noise_scale=-0.5"],
            "noise_scale: must be >= 0 and finite, got -0.5.",
        ),
        (["--problem=noisy_quadratic", "--noise_scale=nan"], "got nan."),
        # Refused before the study: after it, its results were lost.
        (["--output_dir=/proc/nope"], "output_dir=/proc/nope cannot be created"),
        (["--no_such_flag=1"], "no_such_flag"),
        (["stray"], "distopt.compare: error: unexpected arguments ['stray']"),
    ],
)
def test_bad_input_clear_message_nonzero_exit(args, message, capsys):
    assert _run_cli(*args) != 0
    err = capsys.readouterr().err
    assert message in err, err


def test_a_rerun_replaces_the_study_whole_or_not_at_all(tmp_path, capsys, monkeypatch):
    """A full disk left a truncated results.json (the earlier one lost) and
    a traceback; a rerun kept the figures of optimizers it did not run."""
    pytest.importorskip("matplotlib")
    from distopt import output_files

    out = tmp_path / "study"
    common = ["--learning_rates=0.01", "--max_iters=50", f"--output_dir={out}"]

    def files():
        return {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*suffixes):
        real = output_files.os.replace

        def replace(src, dst):
            if dst.endswith(suffixes):  # As a write or fsync: no file named.
                raise OSError(28, "No space left on device")
            real(src, dst)

        monkeypatch.setattr(output_files.os, "replace", replace)

    assert _run_cli("--optimizers=gradient_descent,momentum", *common) == 0
    first = files()
    assert "paths_gradient_descent.png" in first
    capsys.readouterr()
    for suffixes in [(".json",), (".png",)]:
        full_disk(*suffixes)
        assert _run_cli("--optimizers=momentum", *common) == 1
        monkeypatch.undo()
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"distopt.compare: error: could not write {out}/")
        assert line.endswith(
            ("results.json: No space left on device", ".png: No space left on device")
        ), line
        now = files()  # Nothing truncated, no temporary file.
        assert [n for n in now if n.startswith(".")] == []
        for name in first:
            if name.endswith(suffixes):
                assert now[name] == first[name], name
    assert _run_cli("--optimizers=momentum", *common) == 0
    printed = capsys.readouterr().out
    assert f"Removed {out}/paths_gradient_descent.png" in printed, printed
    assert sorted(files()) == [
        "loss_and_gradient.png",
        "loss_curves.png",
        "paths_momentum.png",
        "results.json",
    ]


def test_memory_follows_the_steps_taken_and_ctrl_c_is_one_line(capsys, monkeypatch):
    # The path was allocated for max_iters points: gigabytes (or bad_alloc)
    # for a run that converges in a few hundred steps.
    problem = problems_lib.get("quartic")
    spec = compare.parse_optimizers("momentum")[0]
    run = study.run_one(problem, spec, 0.01, max_iters=compare._MAX_ITERS)
    again = study.run_one(problem, spec, 0.01, max_iters=2000)
    assert run.outcome == again.outcome == "converged"
    assert run.iterations == again.iterations < 2000
    np.testing.assert_array_equal(run.path, again.path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "run_study", interrupted)
    assert _run_cli("--nofigures") == 130
    assert capsys.readouterr().err.splitlines() == ["distopt.compare: interrupted"]


def test_bad_input_from_the_command_line_is_its_only_output():
    # No TensorFlow start-up block either (held back unless --verbosity=1).
    proc = run_python("-m", "distopt.compare", "--optimizers=nope", timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert "unknown optimizer 'nope'; valid names:" in line
    assert proc.stdout == ""


def test_every_flag_has_help(capsys):
    assert _run_cli("--help") == 0
    text = capsys.readouterr().out
    for name in (
        "optimizers",
        "learning_rates",
        "problem",
        "max_iters",
        "output_dir",
        "strategy",
        "virtual_devices",
    ):
        assert compare._FLAGS[name].help, name
        assert f"--{name}" in text


def test_parse_optimizers_syntax():
    specs = compare.parse_optimizers(
        "momentum:momentum=0.5,nesterov=true, adam:beta_1=0.8,sam:base_optimizer=adam,rho=0.1"
    )
    assert [(s.name, s.hyperparameters) for s in specs] == [
        ("momentum", {"momentum": 0.5, "nesterov": True}),
        ("adam", {"beta_1": 0.8}),
        ("sam", {"base_optimizer": "adam", "rho": 0.1}),
    ]
    assert specs[0].label == "momentum(momentum=0.5, nesterov=True)"


# --- Problems ----------------------------------------------------------------------


@pytest.mark.parametrize("name", problems_lib.names())
def test_problem_gradient_and_minimum(name):
    problem = problems_lib.get(name)
    rng = np.random.default_rng(0)
    for x in [problem.start, *rng.uniform(-1.5, 1.5, size=(3, problem.dim))]:
        x = tf.constant(x, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = problem.objective(x, 5)
        np.testing.assert_allclose(
            tape.gradient(loss, x), problem.gradient(x, 5), rtol=1e-5, atol=1e-4
        )
    x_star = problem.minimum.astype(np.float64)
    np.testing.assert_allclose(problem.loss(x_star), problem.min_loss, atol=1e-12)
    np.testing.assert_allclose(problem.gradient(x_star), 0.0, atol=1e-12)


def test_the_command_line_lists_the_registered_problems():
    # compare.py names them without importing TensorFlow (its --help is fast).
    assert list(compare.PROBLEMS) == problems_lib.names()


def test_quartic_critical_points():
    q = problems_lib.get("quartic")
    assert q.minimum[0] == F32(-9 / 8) and q.start[0] == 2.0 and q.saddle[0] == 0.0
    assert q.gradient(np.array([0.0]))[0] == 0.0
    xs = np.linspace(-3, 3, 6001)[:, None]
    assert np.isclose(xs[np.argmin(q.loss(xs)), 0], -1.125)
