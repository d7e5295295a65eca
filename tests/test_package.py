"""Packaging and CLI surface: stage folders import from wheel and editable installs."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import agevlm_edge
from conftest import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_stage_packages_live_in_the_agevlm_edge_namespace():
    import agevlm_edge.export
    import agevlm_edge.quant
    import agevlm_edge.train

    assert Path(agevlm_edge.train.__file__).resolve() == ROOT / "train" / "__init__.py"
    assert Path(agevlm_edge.export.__file__).resolve() == ROOT / "export" / "__init__.py"
    assert Path(agevlm_edge.quant.__file__).resolve() == ROOT / "quant" / "__init__.py"


def test_wheel_maps_stage_folders_and_imports_them(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("agevlm_edge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in ("train", "export", "quant", "data", "eval"):
        assert f"agevlm_edge/{pkg}/__init__.py" in names
    assert not any(n.startswith(("train/", "export/", "quant/")) for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    code = ("import agevlm_edge.train, agevlm_edge.export, agevlm_edge.quant, agevlm_edge; "
            "print(agevlm_edge.train.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().startswith(str(target))


def test_help_lists_every_command_and_version():
    out = run_cli("--help", check_rc=0).stdout
    for cmd in ("pipeline", "data", "train", "eval"):
        assert cmd in out
    data = run_cli("data", "--help", check_rc=0).stdout
    for cmd in ("synth", "import", "masks", "tokenizer"):
        assert cmd in data
    assert run_cli("--version", check_rc=0).stdout.strip() == f"agevlm, version {agevlm_edge.__version__}"


def test_usage_errors_are_one_line_exit_2():
    proc = run_cli("data", "synth", "--bogus")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "--bogus" in lines[0]
    proc = run_cli("nosuchcommand")
    assert proc.returncode == 2 and "nosuchcommand" in proc.stderr


def test_core_package_imports_nothing_heavy():
    code = ("import sys, agevlm_edge, agevlm_edge.errors, agevlm_edge.fsutil; "
            "print(sorted(m for m in ('torch', 'transformers', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_file_given_for_a_directory_is_named_as_a_file(tmp_path):
    """DATA DIR, RUN DIR and EXPORT DIR given as a file (or missing): one line that says which."""
    (tmp_path / "afile").write_text("x")
    for args, what, fix in [
            (("data", "tokenizer", "--data"), "data directory", "agevlm data synth"),
            (("export", "--out", str(tmp_path / "x"), "--model"), "run directory", "agevlm train"),
            (("infer", "--image", str(tmp_path / "afile"), "--prompt", "hi", "--model"),
             "export directory", "agevlm export")]:
        for name, says in (("afile", f"{what} {tmp_path / 'afile'} is a file, not a directory"),
                           ("absent", f"{what} not found: {tmp_path / 'absent'}")):
            assert_one_line_error(run_cli(*args, str(tmp_path / name)), says, fix)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_output_file_where_none_can_be_made_fails_before_any_work(tmp_path):
    """eval --out in /proc (root may 'write' anywhere by os.access) was caught only after the
    whole evaluation; a real probe refuses it first, before the model is even looked at."""
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    assert_one_line_error(run_cli("eval", "--model", str(tmp_path / "absent"), "--data",
                                  str(tmp_path), "--out", "/proc/agevlm-eval.json"),
                          "cannot write /proc/agevlm-eval.json", "no file can be created in /proc")


def test_json_too_deep_or_a_directory_is_one_clear_error(tmp_path):
    from agevlm_edge.errors import BadInput
    from agevlm_edge.fsutil import read_json

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BadInput, match="nests too deep"):
        read_json(deep)
    with pytest.raises(BadInput, match="is a directory"):
        read_json(tmp_path)


def test_an_out_never_replaces_part_of_an_input(tmp_path):
    """--out inside an input (an existing, non-empty directory there) is refused even with
    --overwrite; a new directory inside it is fine. A drift --out naming its budget file too."""
    from agevlm_edge.errors import BadInput
    from agevlm_edge.fsutil import check_out

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "a.png").write_bytes(b"x")
    with pytest.raises(BadInput, match="inside the DATA DIR"):
        check_out(data / "images", [("DATA DIR", data)], overwrite=True)
    check_out(data / "new", [("DATA DIR", data)], overwrite=True)
    budget = tmp_path / "budget.json"
    budget.write_text('{"chair_i_rise": 1}')
    proc = run_cli("drift", "--reference", data / "new", "--candidate", data / "new", "--data", data,
                   "--budget", budget, "--out", budget)
    assert_one_line_error(proc, "would replace the budget file")
    assert budget.read_text() == '{"chair_i_rise": 1}'
    from agevlm_edge.fsutil import staged_dir

    gdir = tmp_path / "g"
    gdir.mkdir()
    (gdir / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(BadInput, match="would replace the GGUF file"):
        with staged_dir(gdir, overwrite=True, inputs=[("GGUF file", gdir / "m.gguf")]):
            pass
    assert (gdir / "m.gguf").read_bytes() == b"GGUF"


def test_staged_dir_puts_the_old_directory_back_when_a_signal_lands_between_renames(
        tmp_path, monkeypatch):
    import agevlm_edge.fsutil as fsutil

    out = tmp_path / "state"
    out.mkdir()
    (out / "a").write_text("old")
    real, calls = os.replace, []

    def replace(src, dst):        # the second rename (new -> out) is interrupted
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with fsutil.staged_dir(out, overwrite=True) as tmp:
            (tmp / "a").write_text("new")
    monkeypatch.setattr(fsutil.os, "replace", real)
    assert (out / "a").read_text() == "old" and os.listdir(tmp_path) == ["state"]
    with fsutil.staged_dir(out, overwrite=True) as tmp:
        (tmp / "a").write_text("new")
    assert (out / "a").read_text() == "new" and os.listdir(tmp_path) == ["state"]


def test_report_refuses_a_damaged_search_json_or_a_repeated_dir_before_measuring(tmp_path):
    from agevlm_edge.errors import BadInput
    from agevlm_edge.report import check_report_args

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "dataset.json").write_text("{}")
    (tmp_path / "s").mkdir()
    for bad in ("[]", '{"method": "m", "sensitivity": [], "path": []}'):
        (tmp_path / "s" / "search.json").write_text(bad)
        with pytest.raises(BadInput, match="search.json lacks method, sensitivity, path, chosen"):
            check_report_args([tmp_path / "s"], tmp_path / "out", tmp_path / "d", False)
    with pytest.raises(BadInput, match="given twice"):   # before search.json is read
        check_report_args([tmp_path / "s", tmp_path / "d" / ".." / "s"], tmp_path / "out",
                          tmp_path / "d", False)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(BadInput, match="loop is not an EXPORT DIR"):
        check_report_args([tmp_path / "loop"], tmp_path / "out", tmp_path / "d", False)
