"""Stage 5, export: compact.onnx with the ORT parity check and the latency comparison, compact.pt, and
for a uniform causal LM the compact_hf/ folder from_pretrained loads."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from hyperflux_fx.cli.job import Job, fail, log, say
from hyperflux_fx.export.hf_folder import NotUniform, check_hf_folder, save_hf_folder
from hyperflux_fx.export.latency import compare_latency
from hyperflux_fx.export.onnx import ExportCheckError, ExportError, export_onnx
from hyperflux_fx.report.summary import FASTER, slower_note, speedup


def export_stage(job: Job, compact: Any, summary: dict[str, Any]) -> int | None:
    """[4/5] ONNX export with the parity check, dense and compact latency; an exit code on failure."""
    say(job.args, "[4/5] ONNX export, parity check, latency")
    inputs = job.inputs
    # weight masks leave zeros that dense kernels still compute: stored sparsely they at least make the
    # file smaller (export_onnx converts only the tensors whose sparse form is smaller)
    sparse = job.args.granularity in ("weight", "hybrid")
    try:
        rep = export_onnx(compact, inputs, job.partial / "compact.onnx", sparse_storage=sparse)
        batch = int(inputs[0].shape[0])
        with tempfile.TemporaryDirectory() as tmp:
            dense = export_onnx(job.loaded.model.eval(), inputs, Path(tmp) / "dense.onnx")
            lat_d, lat_c = compare_latency([Path(tmp) / "dense.onnx", job.partial / "compact.onnx"], batch=batch)
    except (ExportError, ExportCheckError) as exc:
        return fail(f"export failed: {exc}", code=1)
    summary.update(onnx_parity_max_abs_diff=rep.max_abs_diff, ort_latency_ms_dense=lat_d["median_ms"],
                   ort_latency_ms_compact=lat_c["median_ms"], onnx_file_bytes=rep.file_bytes,
                   onnx_file_bytes_dense=dense.file_bytes, onnx_sparse_initializers=len(rep.sparse_initializers),
                   latency_batch=batch)
    x = speedup(summary)
    summary.update(speedup=x, faster_than_dense=x >= FASTER, latency_note=slower_note(summary))
    if job.loaded.language_model:  # tokens per second of one forward pass over the example batch
        tokens = int(inputs[0].numel())
        summary.update(tokens_per_s_dense=tokens / lat_d["median_ms"] * 1e3,
                       tokens_per_s_compact=tokens / lat_c["median_ms"] * 1e3)
    if summary.get("latency_predicted_speedup"):
        # the model predicts a fraction of the dense model; in ms it is anchored on the dense model's ms
        # measured beside the compact one, as the machine's speed drifts between calibration and now
        summary["latency_predicted_ms_compact"] = lat_d["median_ms"] / summary["latency_predicted_speedup"]
    return None


def save_compact(job: Job, compact: Any) -> None:
    torch.save({"state_dict": compact.state_dict(), "code": compact.code,
                "example_input_shapes": [list(x.shape) for x in job.inputs]}, job.partial / "compact.pt")


HF_FOLDER = "compact_hf"


def hf_folder(job: Job, compact: Any) -> dict[str, Any]:
    """For an hf: causal LM: the compact model as a Hugging Face folder (OUT/compact_hf), loaded back and
    checked against the compact graph; or why there is none."""
    if not job.loaded.language_model or not job.args.source.startswith("hf:"):
        return {}
    path = job.partial / HF_FOLDER
    try:
        folder = save_hf_folder(compact.state_dict(), job.args.source[3:], path)
        diff = check_hf_folder(path, compact, job.inputs)
    except Exception as exc:  # NotUniform, or transformers refusing the config (LlamaConfig's validation raises
        #   huggingface_hub's StrictDataclassClassValidationError, not a ValueError): the run's other files stand
        shutil.rmtree(path, ignore_errors=True)
        note = " ".join(str(exc).split())
        if not isinstance(exc, NotUniform):
            log.warning("no %s/ written: %s", HF_FOLDER, note)
        if not job.args.uniform_layers and not isinstance(exc, NotUniform):
            note += " (--uniform-layers keeps the width a multiple of the heads)"
        say(job.args, f"      no {HF_FOLDER}/ written: {note}")
        return {"hf_folder": None, "hf_folder_note": note}
    say(job.args, f"      {HF_FOLDER}/: from_pretrained loads it ({folder.config}); logits within {diff:.2e} of the "
                   "compact graph")
    return {"hf_folder": HF_FOLDER, "hf_folder_config": folder.config, "hf_folder_max_abs_diff": diff}
