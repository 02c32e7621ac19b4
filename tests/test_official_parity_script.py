"""benchmarks/official_parity.py refuses, in one line, a path that is not a checkout of the official EchoMimicV2
repository (the parity run itself needs that checkout and is not part of the tests; benchmarks/RESULTS.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "official_parity.py"


def _script():
    spec = importlib.util.spec_from_file_location("official_parity", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("case", ["missing", "empty", "partial"])
def test_refuses_a_path_that_is_not_an_official_checkout(tmp_path, capsys, case):
    parity = _script()
    path = tmp_path / "echomimic_v2"
    if case != "missing":
        path.mkdir()
    if case == "partial":  # some of the official files, not all of them
        (path / "src" / "models").mkdir(parents=True)
        (path / "src" / "models" / "unet_3d_emo.py").write_text("")
    with pytest.raises(SystemExit) as e:
        parity.main(["--official", str(path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: --official=") and str(path) in err
    if case == "missing":
        assert "not a directory" in err
    else:
        missing = "src/models/unet_3d_emo.py" if case == "empty" else "src/models/unet_2d_condition.py"
        assert f"not a checkout of antgroup/echomimic_v2 (no {missing}" in err
