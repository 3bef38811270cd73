"""A checkpoint without manifest.json (written by another program, such as Megatron-LM)
cannot be checked for corruption: loading says so instead of staying silent."""

from megatron.training.checkpointing import api


def test_a_checkpoint_without_a_manifest_is_named_as_unverified(tmp_path, capsys):
    directory = str(tmp_path / "iter_0000002")
    (tmp_path / "iter_0000002").mkdir()
    assert api._verify(directory, 0, 1, None) is None
    out = capsys.readouterr().out
    assert f"WARNING: {directory} has no manifest.json" in out and "cannot be checked for corruption" in out
