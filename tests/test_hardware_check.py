"""`python -m distopt.hardware_check`: here on virtual CPUs, under `-m accelerator` on GPUs/TPUs.

The program runs in a subprocess: its devices (virtual CPUs, a split GPU)
must be configured before TensorFlow initialises them, which this test
process (see conftest.py) has already done. The CPU run hides any GPU
(`CUDA_VISIBLE_DEVICES=-1`), so it is the same run on every machine.

`python -m pytest -m accelerator` runs the program on the GPUs found (or on
the TPU named by `DISTOPT_TPU`, passed as `--tpu`), one test per check; the
tests skip, saying why, where there is neither.
"""

import json
import os
import re
import socket
import subprocess
import sys
import types
import urllib.error

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO

from distopt import distribute as dist
from distopt import hardware_check as hc

#: The rows of a run on GPUs or CPUs (a TPU run swaps the periodic ones
#: for the rejection row).
NON_TPU_KEYS = [k for k in hc.CHECK_KEYS if k != "tpu_rejects_periodic"]


def run_program(out_dir, *flags, env=None, timeout):
    """Runs the program with `--json`; returns the process and the JSON rows."""
    path = os.path.join(out_dir, "rows.json")
    proc = subprocess.run(
        [sys.executable, "-m", "distopt.hardware_check", f"--json={path}", *flags],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
    )
    report = None
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
    return proc, report


def table_rows(stdout):
    """The body rows of the printed table, as lists of cells."""
    lines = stdout.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("check "))
    assert set(lines[start + 1].replace(" ", "")) == {"-"}
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        rows.append(line)
    return rows


def test_every_check_passes_on_virtual_cpus(tmp_path):
    proc, report = run_program(
        tmp_path, env={"CUDA_VISIBLE_DEVICES": "-1"}, timeout=300
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    # The first line of output says what was found: no TensorFlow start-up
    # lines before it (on stderr), nor anywhere.
    assert not re.search(
        r"^(E0000|W0000) |cuda_platform|absl::InitializeLog",
        proc.stderr,
        re.MULTILINE,
    ), proc.stderr
    first = out.splitlines()[0]
    assert first.startswith("No GPU or TPU found: running on 4 virtual CPU"), first
    # One progress line per check, then the table: every row passed.
    assert out.count(" ...\n") == len(NON_TPU_KEYS)
    rows = table_rows(out)
    assert len(rows) == len(NON_TPU_KEYS), rows
    for row in rows:
        assert "  4 CPU" in row and "  passed  " in row and "FAILED" not in row, row
    assert f"{len(rows)}/{len(rows)} checks passed on 4 CPU" in out
    assert [r["key"] for r in report["rows"]] == NON_TPU_KEYS
    assert report["kind"] == "CPU" and report["num_replicas"] == 4
    hier = next(r for r in report["rows"] if r["key"] == "hierarchical")
    assert "group_size=2" in hier["check"]
    identical = next(r for r in report["rows"] if r["key"] == "replicas_identical")
    assert identical["max_error"] == 0.0


def test_a_failed_check_fails_the_exit_status_and_the_table():
    rows = [
        hc.Row("a", "first check", "4 CPU", True, 1e-7, ""),
        hc.Row("b", "second check", "4 CPU", False, 0.5, "w: replica 1"),
    ]
    assert hc.exit_status(rows) == 1
    assert hc.exit_status(rows[:1]) == 0
    assert hc.exit_status([]) == 1
    table = hc.format_table(rows).splitlines()
    assert table[0].split() == ["check", "devices", "result", "max", "error"]
    assert "passed" in table[2] and "1.00e-07" in table[2]
    assert "FAILED" in table[3] and "5.00e-01" in table[3]


def test_comparisons_fail_outside_tolerance_on_nan_and_on_one_bit():
    c = hc.Check()
    c.close("w", [np.float32([1.0, 2.0])], [1.0, 2.0 + 1e-6])  # within tolerance
    assert c.max_error == pytest.approx(1e-6)
    with pytest.raises(hc._Mismatch, match="w, replica 3: max .error. 0.001"):
        c.close("w", [np.float32([1.0, 2.001])], [1.0, 2.0], ids=[3])
    c = hc.Check()
    with pytest.raises(hc._Mismatch, match="nan"):
        c.close("w", [np.float32([np.nan])], [1.0])
    assert np.isnan(c.max_error)
    one_ulp = np.nextafter(np.float32(1.0), np.float32(2.0))
    with pytest.raises(hc._Mismatch, match="must be 0"):
        hc.Check().close("w", [np.float32([one_ulp])], np.float32([1.0]), exact=True)
    with pytest.raises(hc._Mismatch, match="moved only"):
        hc.Check().moved("w", [1.0 + 1e-3], [1.0])


def test_the_rejection_row_needs_a_value_error_from_every_periodic_mode(monkeypatch):
    # No TPU here: under the default strategy nothing is rejected, so the row
    # fails; with `is_tpu` answering True, the library's own check raises,
    # and the row passes.
    platform = hc.Platform(tf.distribute.get_strategy(), "TPU", "", "1 TPU")
    with pytest.raises(hc._Mismatch, match="local_sgd: built under"):
        hc.check_tpu_rejects_periodic(platform, [], hc.Check())
    monkeypatch.setattr(dist, "is_tpu", lambda strategy: True)
    detail = hc.check_tpu_rejects_periodic(platform, [], hc.Check())
    assert detail.startswith("local_sgd, diloco, hierarchical: ValueError")


def test_the_checks_of_each_platform():
    def keys(kind, n):
        platform = types.SimpleNamespace(num_replicas=n, is_tpu=kind == "TPU")
        return [key for key, _, _ in hc.checks(platform)]

    assert keys("GPU", 8) == NON_TPU_KEYS
    assert keys("TPU", 8) == [
        "every_step_adam",
        "every_step_momentum",
        "weighted_mean",
        "accumulate",
        "tpu_rejects_periodic",
        "checkpoint",
        "replicas_identical",
    ]
    assert [hc.hierarchical_group_size(n) for n in (2, 3, 4, 6, 5, 8)] == [
        1,
        1,
        2,
        2,
        1,
        2,
    ]


@pytest.mark.parametrize(
    "argv,message",
    [(["unexpected"], "unexpected arguments"), (["--cpu_devices=x"], "cpu_devices")],
)
def test_usage_errors_exit_2(capsys, argv, message):
    assert hc.main(["hardware_check", *argv]) == 2
    assert message in capsys.readouterr().err


def _no_checks(*args):
    raise AssertionError("a check ran")


@pytest.mark.parametrize(
    "where, says",
    [
        ("missing/rows.json", "missing/rows.json: the directory "),
        ("", " is a directory"),  # tmp_path itself
        ("/proc/rows.json", "/proc is not writable"),
    ],
)
def test_a_json_path_that_cannot_be_written_is_refused_before_any_check(
    tmp_path, monkeypatch, capsys, where, says
):
    # It was opened after every check had run: a traceback and exit status
    # 1, which says a check failed.
    monkeypatch.setattr(hc, "make_platform", _no_checks)
    path = os.path.join(tmp_path, where)
    assert hc.main(["hardware_check", f"--json={path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"distopt.hardware_check: error: --json={path}"), err
    assert says in err and err.count("\n") == 1, err


@pytest.mark.parametrize("passed, status", [(True, 3), (False, 1)])
def test_a_json_write_that_fails_is_one_line_and_leaves_no_file(
    tmp_path, monkeypatch, capsys, passed, status
):
    # A full disk at the end: the checks' result stands in the table and
    # the exit status says which (3 is not 1, "a check failed").
    platform = types.SimpleNamespace(
        notice="n", kind="CPU", num_replicas=2, devices="2 CPU"
    )
    monkeypatch.setattr(hc, "make_platform", lambda *args: platform)
    row = hc.Row("a", "a check", "2 CPU", passed, 0.0)
    monkeypatch.setattr(hc, "run_checks", lambda platform: [row])

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    path = tmp_path / "rows.json"
    assert hc.main(["hardware_check", f"--json={path}"]) == status
    assert os.listdir(tmp_path) == []  # Neither the file nor a temporary.
    assert capsys.readouterr().err == (
        f"distopt.hardware_check: error: --json: could not write {path}: "
        "No space left on device\n"
    )


@pytest.mark.parametrize(
    "error",
    [
        urllib.error.URLError(socket.gaierror(-2, "Name or service not known")),
        ValueError("Could not lookup TPU metadata\nmore"),
    ],
)
def test_a_tpu_that_cannot_be_reached_is_one_line_naming_the_flag(
    monkeypatch, capsys, error
):
    # The resolver's URLError was a 71-line traceback and exit status 1.
    def unreachable(kind, **kwargs):
        raise error

    monkeypatch.setattr(dist, "make_strategy", unreachable)
    assert hc.main(["hardware_check", "--tpu=bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "distopt.hardware_check: error: --tpu=bogus: no such TPU, or it cannot "
        f"be reached ({type(error).__name__}: "
    ), err
    assert err.count("\n") == 1, err


def test_help_exits_0_and_names_every_flag(capsys):
    assert hc.main(["hardware_check", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("cpu_devices", "tpu", "split_gpu", "gpu_memory_mb", "json"):
        assert f"--{name}" in out, name


# --- On accelerators ---------------------------------------------------------------


@pytest.fixture(scope="module")
def accelerator_run(tmp_path_factory):
    """One run of the program on the GPUs found, or on `DISTOPT_TPU`."""
    tpu = os.environ.get("DISTOPT_TPU", "")
    if not tpu and not tf.config.list_physical_devices("GPU"):
        pytest.skip(
            "no accelerator: TensorFlow sees no GPU and DISTOPT_TPU (a TPU for "
            "--tpu) is unset; the CPU run is test_every_check_passes_on_virtual_cpus"
        )
    flags = [f"--tpu={tpu}"] if tpu else []
    proc, report = run_program(
        tmp_path_factory.mktemp("hardware_check"), *flags, timeout=600
    )
    assert report is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, report


@pytest.mark.accelerator
def test_accelerator_run_exits_0(accelerator_run):
    proc, report = accelerator_run
    assert report["kind"] in ("GPU", "TPU"), report["notice"]
    assert report["num_replicas"] >= 2
    assert proc.returncode == 0, proc.stdout[-3000:]


@pytest.mark.accelerator
@pytest.mark.parametrize("key", hc.CHECK_KEYS)
def test_accelerator_check(accelerator_run, key):
    _, report = accelerator_run
    rows = {r["key"]: r for r in report["rows"]}
    if key not in rows:
        if report["kind"] == "TPU":
            pytest.skip(f"{key}: rejected under TPUStrategy by design (see that row)")
        pytest.skip(f"{key}: TPUStrategy only")
    row = rows[key]
    assert row["passed"], f"{row['check']} on {row['devices']}: {row['detail']}"
