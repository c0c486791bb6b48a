"""`domaintok export-onnx`: the user encoder of a pretrained model as ONNX, checked against onnxruntime.

The graph maps (input_ids, attention_mask) with dynamic batch and sequence axes to the user embedding.
"""

from __future__ import annotations

from pathlib import Path

import click

from domaintok.errors import DomaintokError

# Float32 on CPU agrees to ~1e-6; anything near this bound means the export is wrong, not just rounding.
PARITY_TOLERANCE = 1e-4


def export_onnx(model_dir: Path, output: Path, opset: int = 18) -> float:
    """Export and verify; returns the max abs difference between torch and onnxruntime embeddings."""
    from domaintok.models.embedding import load_encoder
    from domaintok.models.onnx_export import export_encoder, onnx_parity

    model = load_encoder(model_dir, device="cpu")
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        export_encoder(model, tmp, opset=opset)
        max_abs_diff = onnx_parity(model, tmp)
        if max_abs_diff > PARITY_TOLERANCE:
            raise DomaintokError(
                f"{output}: onnxruntime differs from torch by {max_abs_diff:.2e} (> {PARITY_TOLERANCE:.0e}); not written"
            )
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    return max_abs_diff


@click.command("export-onnx")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Pretrained model directory (`domaintok pretrain`).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="model.onnx to write.")
@click.option("--opset", type=click.IntRange(min=14), default=18, show_default=True)
def command(model_dir, output, opset):
    """Export the encoder (input_ids, attention_mask -> user embedding) to ONNX and check it with onnxruntime.

    Prints the max absolute difference between torch and onnxruntime on random padded batches; refuses to
    write a model that differs by more than 1e-4.
    """
    max_abs_diff = export_onnx(model_dir, output, opset=opset)
    click.echo(f"exported {output} (opset {opset}); onnxruntime vs torch max abs diff {max_abs_diff:.2e}")
    return max_abs_diff
