"""User mistakes on the command line end in one line naming the key and the value, exit code 2, before heavy work.

Most cases run in-process (Hydra ``compose`` + the start-up checks that ``train()`` runs first); two go through the
real ``python -m halfbody.train`` (one in the fast suite), and the README's brace-pattern commands are parsed
exactly as written.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import open_dict

from config_utils import compose_train
from halfbody.train import train
from halfbody.utils.errors import UserError, exit_on_user_error
from halfbody.utils.hydra import REPO_ROOT, quote_brace_patterns
from halfbody.utils.startup_checks import check_config

from shard_utils import make_sample, write_shard


def _compose(overrides: list[str]):
    return compose_train(["logger=none", *overrides])


def _check(overrides: list[str]) -> str:
    with pytest.raises(UserError) as err:
        check_config(_compose(overrides))
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Real shards (one schema sample, copied to 124 + 10 shard names), non-shards, and real checkpoints of each family."""
    root = tmp_path_factory.mktemp("cli")
    shards = root / "talk"
    shards.mkdir()
    first = write_shard(shards / "train-000000.tar", [make_sample("s0", num_frames=9, height=32, width=32)])
    for i in range(1, 124):
        shutil.copyfile(first, shards / f"train-{i:06d}.tar")
    for i in range(10):
        shutil.copyfile(first, shards / f"val-{i:06d}.tar")
    not_shards = root / "not_shards"
    not_shards.mkdir()
    for i in range(2):
        (not_shards / f"part-{i}.tar").write_text("these are notes, not a tar archive\n")
    (root / "no_shards").mkdir()
    ckpts = root / "ckpts"
    ckpts.mkdir()
    for family in ("echomimic_v2", "mirrorme"):
        model = hydra.utils.instantiate(_compose([f"family={family}"]).model)
        torch.save({"epoch": 0, "global_step": 3, "state_dict": model.state_dict(), "loops": {},
                    "optimizer_states": [], "lr_schedulers": [], "hyper_parameters": dict(model.hparams)},
                   ckpts / f"{family}.ckpt")
    good = ckpts / "step_0000003.ckpt"
    shutil.copyfile(ckpts / "echomimic_v2.ckpt", good)
    data = good.read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])  # a save killed halfway
    (ckpts / "notes.ckpt").write_text("training notes\n")
    return {"root": root, "shards": shards, "not_shards": not_shards, "no_shards": root / "no_shards",
            "ckpts": ckpts, "good": good}


CASES = {
    # id: (overrides with {placeholders}, expected message pattern)
    "shards_unset": (["data=shards"], r"^data\.train_shards is not set"),
    "shards_missing": (["data=shards", "data.train_shards={root}/nope.tar"],
                       r"^data\.train_shards='.*/nope\.tar': shard .* does not exist"),
    "shards_empty": (["data=shards", "data.train_shards=''"], r"^data\.train_shards='' is empty"),
    "glob_no_match": (["data=shards", "data.train_shards={shards}/zz-*.tar"],
                      r"^data\.train_shards='.*zz-\*\.tar': pattern .* matches no files"),
    "folder_no_shards": (["data=shards", "data.train_shards={no_shards}"],
                         r"^data\.train_shards='.*no_shards': directory has no \*\.tar shards"),
    "folder_of_non_shards": (["data=shards", "data.train_shards={not_shards}"],
                             r"^data\.train_shards='.*not_shards': none of its 2 file\(s\) is a tar archive"),
    "val_shards_missing": (["data=shards", "data.train_shards={shards}", "data.val_shards={root}/val"],
                           r"^data\.val_shards='.*/val': shard .* does not exist"),
    "ckpt_missing": (["ckpt_path=/nope.ckpt"], r"^ckpt_path='/nope\.ckpt' does not exist"),
    "ckpt_text_file": (["ckpt_path={ckpts}/notes.ckpt"],
                       r"^ckpt_path='.*notes\.ckpt' is not a Lightning checkpoint"),
    "ckpt_truncated": (["ckpt_path={ckpts}/last.ckpt"],
                       r"^ckpt_path='.*last\.ckpt' is truncated .*newest good checkpoint .*step_0000003\.ckpt'$"),
    "ckpt_other_family": (["family=mirrorme", "ckpt_path={ckpts}/echomimic_v2.ckpt"],
                          r"^ckpt_path='.*echomimic_v2\.ckpt' is a checkpoint of family echomimic_v2, but this run "
                          r"builds family mirrorme"),
    "init_ckpt_other_family": (["model.init_checkpoint={ckpts}/mirrorme.ckpt"],
                               r"^model\.init_checkpoint='.*mirrorme\.ckpt' is a checkpoint of family mirrorme"),
    "init_ckpt_missing": (["model.init_checkpoint={root}/missing.ckpt"],
                          r"^model\.init_checkpoint='.*missing\.ckpt' does not exist"),
    "resolution_vs_patch": (["data.resolution=66"],
                            r"^data\.resolution=66: the autoencoder \(PatchAutoencoder\) needs height and width "
                            r"divisible by 8"),
    "frames_vs_causal_ae": (["family=mirrorme", "data.num_frames=12"],
                            r"^data\.num_frames=12: the causal autoencoder \(PatchAutoencoder\) needs 1 \+ k\*8 "
                            r"frames \(e\.g\. 9, 17, 25\)"),
    "phase_frames_vs_causal_ae": (["experiment=mirrorme_full", "preset=tiny_cpu",
                                   "+mirrorme.halfbody.num_frames=16"],
                                  r"^callbacks\.curriculum\.phases\[1\]\.num_frames \(phase 'halfbody'\)=16: the "
                                  r"causal autoencoder"),
    "image_ae_for_dit": (["family=mirrorme", "model/autoencoder=patch"],
                         r"^model\.autoencoder=PatchAutoencoder \(temporal factor 1\): MirrorMe needs a causal video "
                         r"autoencoder"),
    "video_ae_for_unet": (["model/autoencoder=patch_causal"],
                          r"^model\.autoencoder=PatchAutoencoder \(temporal factor 8\): EchoMimicV2 denoises frame"),
    "num_workers": (["data.num_workers=-1"], r"^data\.num_workers=-1: expected an integer >= 0"),
    "lr_not_a_number": (["model.optimizer.lr=abc"], r"^model\.optimizer\.lr='abc': expected a positive number"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error_is_one_line_naming_key_and_value(files, case):
    overrides, pattern = CASES[case]
    msg = _check([o.format(**{k: str(v) for k, v in files.items()}) for o in overrides])
    assert re.search(pattern, msg), msg


def test_valid_configs_pass(files):
    check_config(_compose([]))  # the default run (data generated by data.prepare)
    check_config(_compose(["family=mirrorme", f"ckpt_path={files['ckpts']}/mirrorme.ckpt"]))
    check_config(_compose(["data=shards", f"data.train_shards={files['shards']}",
                           f"model.init_checkpoint={files['good']}"]))


def test_train_fails_before_generating_data_or_building_the_model(tmp_path, monkeypatch):
    import halfbody.echomimic_v2.module as emv

    def must_not_build(*a, **kw):
        raise AssertionError("model built before the start-up checks")

    monkeypatch.setattr(emv.EchoMimicV2Module, "__init__", must_not_build)
    cfg = _compose([f"paths.data_dir={tmp_path}", "data.num_workers=-1"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(UserError, match="data.num_workers=-1"):
        train(cfg)
    assert not (tmp_path / "synthetic_world").exists()


def test_wrapped_user_error_exits_2_with_one_line(capsys, monkeypatch):
    """A UserError from a constructor reaches the entry point wrapped by Hydra's InstantiationException."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("HALFBODY_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        hydra.utils.instantiate({"_target_": "halfbody.utils.startup_checks.check_shards", "spec": "",
                                 "key": "data.val_shards"})
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: data.val_shards='' is empty: expected a shard folder, a brace pattern "
        "(/data/train-{000000..000099}.tar), a glob or a list of them"]
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # the traceback comes back
    with pytest.raises(Exception) as err, exit_on_user_error():
        hydra.utils.instantiate({"_target_": "halfbody.utils.startup_checks.check_shards", "spec": "", "key": "k"})
    assert not isinstance(err.value, SystemExit)
    with pytest.raises(RuntimeError), exit_on_user_error():  # other errors are not user errors
        raise RuntimeError("a bug")


@pytest.mark.parametrize("arg, expected", [
    ("data.train_shards=/d/train-{000000..000099}.tar", 'data.train_shards="/d/train-{000000..000099}.tar"'),
    ("data.train_shards=/d/{a,b}-{0..9}.tar", 'data.train_shards="/d/{a,b}-{0..9}.tar"'),
    ("data.train_shards=/d/a-{0..1}.tar,/d/b.tar", 'data.train_shards="/d/a-{0..1}.tar",/d/b.tar'),  # -m sweep
    ('data.train_shards="/d/train-{0..9}.tar"', 'data.train_shards="/d/train-{0..9}.tar"'),  # already quoted
    ("+model.extra={a: 1, b: 2}", "+model.extra={a: 1, b: 2}"),  # a Hydra dict
    ("paths.data_dir=${paths.root_dir}/x", "paths.data_dir=${paths.root_dir}/x"),  # an interpolation
    ("data.train_shards=choice(/d/{0..1}.tar,/e.tar)", "data.train_shards=choice(/d/{0..1}.tar,/e.tar)"),
    ("--cfg", "--cfg"),
])
def test_quote_brace_patterns(arg, expected):
    assert quote_brace_patterns([arg]) == [expected]


def _readme_commands() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    cmds = re.findall(r"python -m halfbody\.train [^`\n]*data\.train_shards='[^'\n]*\{[^'\n]*'[^`\n]*", text)
    assert cmds, "README has no brace-pattern training command"
    return cmds


def _readme_args(cmd: str, files: dict[str, Path]) -> list[str]:
    """The README command's arguments as the shell passes them, with its data folders moved under tmp."""
    args = shlex.split(cmd)
    assert args[:3] == ["python", "-m", "halfbody.train"], cmd
    return [a.replace("/data/talk_shards/clips-", f"{files['shards']}/train-").replace("/data/talk/", f"{files['shards']}/")
            for a in args[3:]]


def test_readme_brace_pattern_commands_parse_and_pass_the_checks(files):
    """Each README command with a brace pattern goes through Hydra's override parser as the shell passes it."""
    for cmd in _readme_commands():
        args = _readme_args(cmd, files)
        cfg = _compose(quote_brace_patterns(args))
        assert "{" in cfg.data.train_shards and cfg.data.train_shards.endswith(".tar")
        check_config(cfg)  # every shard of the pattern exists and is a tar archive
        with pytest.raises(Exception, match="mismatched input '{'"):  # what Hydra alone says (the original bug)
            _compose(args)


def _cli(args: list[str], cwd: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HALFBODY_ROOT": str(REPO_ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "halfbody.train", *args, "logger=none", f"hydra.run.dir={cwd}/run"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_cli_readme_command_with_a_missing_shard_is_one_line_exit_2(files, tmp_path):
    """The real entry point: the README's brace pattern is parsed, expanded, and a missing shard named in one line."""
    cmd = _readme_commands()[0]
    args = _readme_args(cmd, files)
    missing = files["shards"] / "val-000007.tar"
    moved = tmp_path / "moved.tar"
    shutil.move(missing, moved)
    try:
        proc = _cli(args, tmp_path)
    finally:
        shutil.move(moved, missing)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: data.val_shards='{files['shards']}/val-{{000000..000009}}.tar': shard '{missing}' does not exist")
    assert not [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("error:")]


@pytest.mark.slow  # a second interpreter start-up (~5 s)
def test_cli_full_error_brings_the_traceback_back(files, tmp_path):
    proc = _cli([f"ckpt_path={files['ckpts']}/notes.ckpt"], tmp_path, {"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "is not a Lightning checkpoint" in proc.stderr
    proc = _cli([f"ckpt_path={files['ckpts']}/notes.ckpt"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: ckpt_path='{files['ckpts']}/notes.ckpt' is not a Lightning checkpoint (not a PyTorch checkpoint "
        "archive)")
