"""The `selfpatch` command dispatcher and its `export` subcommand."""

from __future__ import annotations

import torch
from tiny_models import tiny_config
from transformers import AutoModel

from selfpatch_hf import SelfPatchForPretraining
from selfpatch_hf.cli.main import main


def test_export_subcommand_writes_a_loadable_backbone(tmp_path, capsys):
    torch.manual_seed(0)
    model = SelfPatchForPretraining(tiny_config()).eval()
    model.save_pretrained(tmp_path / "pretraining")
    assert (
        main(["export", str(tmp_path / "pretraining"), str(tmp_path / "backbone"), "--source", "student"])
        == 0
    )
    assert "student backbone" in capsys.readouterr().out
    backbone = AutoModel.from_pretrained(tmp_path / "backbone").eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model.student.encode(pixels)[1]
        torch.testing.assert_close(backbone(pixels).last_hidden_state, expected, atol=0, rtol=0)


def test_unknown_command_and_help(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main([]) == 0
    assert "export" in capsys.readouterr().out


def test_export_of_a_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "backbone")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "selfpatch export: error: cannot load a SelfPatchForPretraining"
    )
    (tmp_path / "file").write_text("")
    assert main(["export", str(tmp_path), str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
