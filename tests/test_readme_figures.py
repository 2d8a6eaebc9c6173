"""README.md's measured-figures table is what benchmarks/update_readme.py generates from the committed JSONs."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_figures_block_matches_the_results():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "update_readme.py"), "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_fails_on_a_stale_block(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("update_readme", REPO / "benchmarks" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stale = module.README.read_text().replace("| GFLOPs per view, DiSa / CAT-Seg |", "| GFLOPs per view (old) |")
    readme = tmp_path / "README.md"
    readme.write_text(stale)
    monkeypatch.setattr(module, "README", readme)
    assert module.main(["--check"]) == 1
    assert module.main([]) == 0
    assert module.main(["--check"]) == 0
    assert "(old)" not in readme.read_text()
