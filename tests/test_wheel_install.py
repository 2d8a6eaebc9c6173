"""The installed wheel reads nothing outside itself: build it, install it (not editable) into a scratch venv that
sees the current environment's dependencies but not the editable `modeling_disa`, and from a folder outside the
repository load every evaluation-dataset definition, render the model card from the packaged template and run the
offline demo (which reads the packaged disa-tiny preset)."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHECK = r"""
import json, sys
from pathlib import Path

import modeling_disa
from modeling_disa.demo import main as demo
from modeling_disa.evaluation.dataset_definitions import ALL_DATASETS, load_evaluation_dataset
from modeling_disa.hub import render_model_card

definitions = {name: load_evaluation_dataset(name).num_classes for name in ALL_DATASETS}
card = render_model_card("tester/disa", {"ade150": {"mIoU": 31.5}})
summary = demo(["--output_dir", "demo-out"])
print(json.dumps({"file": modeling_disa.__file__, "definitions": definitions, "card": str(card),
                  "demo": summary, "path": sys.path}))
"""


def run(command, **kwargs):
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, **kwargs)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def source_tree(folder: Path) -> Path:
    """What the wheel is built from, copied away from the checkout so that an in-tree build leaves no `build/` in
    it (and no stale `build/lib` files from an earlier build get into the wheel); links are kept as links."""
    for name in ("setup.py", "README.md", "model_card.md"):
        shutil.copy2(REPO / name, folder / name)
    shutil.copytree(
        REPO / "modeling_disa",
        folder / "modeling_disa",
        symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    return folder


def test_installed_wheel_needs_nothing_outside_itself(tmp_path):
    (tmp_path / "src").mkdir()
    source = source_tree(tmp_path / "src")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheels"),
        ],
        cwd=str(tmp_path),
    )
    (wheel,) = (tmp_path / "wheels").glob("modeling_disa-*.whl")

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # A plain path line: the current site-packages' dependencies become importable, but its .pth files (the
    # editable finder of modeling_disa among them) are not executed.
    (site / "current_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    # pip of the current environment, installing into the scratch venv's site-packages (the venv has no pip).
    run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        env=env,
        cwd=str(tmp_path),
    )

    proc = run([str(python), "-c", CHECK], env=env, cwd=str(tmp_path))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).resolve().is_relative_to(venv.resolve()), out["file"]
    # no path entry can serve the checkout's sources (the dependencies' site-packages may lie inside the checkout,
    # as CI's .ci-venv does, but the package there is only the editable finder, which a plain path entry never runs)
    sources = [p for p in out["path"] if p and (Path(p) / "modeling_disa").is_dir()]
    assert all(Path(p).resolve().is_relative_to(venv.resolve()) for p in sources), sources
    assert str(REPO) not in out["path"] and str(REPO / "training") not in out["path"], out["path"]

    from modeling_disa.evaluation.dataset_definitions import ALL_DATASETS, load_evaluation_dataset
    from modeling_disa.hub import render_model_card

    assert out["definitions"] == {name: load_evaluation_dataset(name).num_classes for name in ALL_DATASETS}
    # the project's card (model_card.md of this checkout, rendered here with the same arguments)
    expected = str(render_model_card("tester/disa", {"ade150": {"mIoU": 31.5}}, template=REPO / "model_card.md"))
    assert out["card"] == expected
    assert out["demo"]["reloaded_identical"] is True
    assert (tmp_path / "demo-out" / "demo_overlay.png").is_file()
