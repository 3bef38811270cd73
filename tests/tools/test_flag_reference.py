"""docs/flags.md is generated from the parser and the flag table and must not go stale."""

from __future__ import annotations

from tools import generate_flag_reference


def test_flag_reference_is_up_to_date():
    assert generate_flag_reference.PAGE.read_text() == generate_flag_reference.render(), (
        "docs/flags.md is stale: run python tools/generate_flag_reference.py")


def test_reference_lists_every_status_with_its_reason():
    page = generate_flag_reference.render()
    assert "| `--use-mcore-models` | — | no effect: models are always built the Megatron-Core way |" in page
    assert "| `--checkpoint-activations` | — | refused: the old spelling was removed" in page
    assert "| `--num-layers` | — | implemented | Number of transformer layers. |" in page
    assert "| `--use-megatron-fsdp`, `--use-custom-fsdp` | off | implemented | Megatron-FSDP's command line" in page
    assert "| `--init-model-with-meta-device` | — | refused: the model is built whole on every rank" in page


def test_check_mode_reports_a_stale_page(tmp_path, monkeypatch):
    stale = tmp_path / "flags.md"
    stale.write_text("old\n")
    monkeypatch.setattr(generate_flag_reference, "PAGE", stale)
    assert generate_flag_reference.main(["--check"]) == 1
    assert generate_flag_reference.main([]) == 0
    assert generate_flag_reference.main(["--check"]) == 0
