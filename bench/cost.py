"""The "projected cost to curate 100M samples" section of BENCHMARKS.md.

Built from the per-stage rates this run measured (CPU-seconds per image on this machine) and the
GPU forward rates in ``bench/results/gpu_rates.json`` (measured on an H100 by
``bench/gpu_rates.py``), plus stated assumptions (prices, node shape, what a GPU does not speed
up). Every assumption is a named constant below and printed in the section, so a reader can redo
the arithmetic with their own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SAMPLES = 100_000_000
# -- assumptions (stated in the section) ---------------------------------------------------------
GPU_HOUR_USD = 2.50  # one H100, on-demand market price order of magnitude (2025)
GPUS_PER_NODE = 8
VCPUS_PER_GPU = 24  # 8-GPU nodes come with ~192 vCPUs (e.g. p5.48xlarge)
CPU_VCPU_HOUR_USD = 0.04  # general-purpose cloud vCPU-hour, on demand
VCPU_PER_CORE_HERE = 1.0  # a vCPU of the GPU node does the work of one core of this machine
GPU_BUSY = 0.6  # fraction of the time a GPU is busy in the streaming DAG (batching gaps, host work)
RECOGNITION_OVER_DETECTION = 0.25  # easyocr's recogniser on GPU, as a share of CRAFT's time (not measured)
MASKED_FORWARDS = 1.5  # image forwards per sample in CLIP scoring (original + masked when text), measured ~1.5
DOWNLOAD_PER_16_CORES = 1000.0  # samples/s of img2dataset on a 16-core node with 1 Gbps (not measured here)
STORAGE_GB_MONTH_USD = 0.02  # object storage
BYTES_PER_SAMPLE_DEFAULT = 45_000  # 512 px JPEG q95, the embedded images' mean; replaced by the measured one


def _by_name(results: list[Any]) -> dict[str, Any]:
    return {r.name: r for r in results if not r.error}


def _gpu_rates() -> dict[str, Any] | None:
    path = Path(__file__).resolve().parent / "results" / "gpu_rates.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def section(results: list[Any], machine: dict[str, Any]) -> str:
    found = _by_name(results)
    gpu = _gpu_rates()
    lines = ["## Projected cost to curate 100M samples", ""]
    dag = found.get("dag")
    ocr = found.get("ocr")
    clip = found.get("clip")
    reshard = found.get("reshard")
    duck = found.get("duckdb")

    # per-image CPU-seconds measured in this run (None when that benchmark did not run)
    decode = dag.data.get("decode_cpu_s_per_image") if dag else None
    parrot = dag.data["stages_alone"]["parrot"]["cpu_s_per_image"] if dag else None
    rapid = dag.data["stages_alone"]["ocr"]["cpu_s_per_image"] if dag and dag.data["engine"] == "rapidocr" else None
    clip_cpu = dag.data["stages_alone"]["clip_score"]["cpu_s_per_image"] if dag else None
    ocr_host = ocr.data.get("host_cpu_s_per_image") if ocr else None
    easy_cpu = ocr.data["runs"]["stage"]["cpu_s_per_image"] if ocr else None
    clip_host = None
    if clip:
        cpu = clip.data["cpu_s_per_image"]
        clip_host = max(0.0, cpu["stage"] - cpu["bare"])
    bytes_per_sample = (reshard.data["payload_mb"] * 1e6 / reshard.data["kept"]) if reshard else BYTES_PER_SAMPLE_DEFAULT
    reshard_mb_s = reshard.data["mb_per_s"]["reshard"] if reshard else None

    def fmt(v: float | None, digits: int = 4) -> str:
        return "n/a (benchmark not in this run)" if v is None else f"{v:.{digits}f}"

    lines += [
        "Measured in this run (CPU-seconds per image, this machine; a GPU node's host cores do this work):",
        "",
        f"- read tar + JPEG decode: {fmt(decode)}",
        f"- OCR host work besides the CRAFT forward (resize, box post-processing, recognition on CPU; an upper "
        f"bound when recognition runs on the GPU): {fmt(ocr_host)}; the whole easyocr stage on CPU: {fmt(easy_cpu)}",
        f"- CLIP host work besides the forward (text masking, preprocessing, tokenizing): {fmt(clip_host)}",
        f"- parrot: {fmt(parrot, 6)}; reshard: {fmt(reshard_mb_s, 0)} MB/s per core at "
        f"{bytes_per_sample / 1e3:.0f} KB per sample",
    ]
    if gpu:
        craft = next((c for c in gpu["craft"] if c["precision"] == "fp16"), gpu["craft"][0])
        vitb = next((c for c in gpu["clip"] if c["model"] == "ViT-B-32" and c["precision"] == "bf16"), gpu["clip"][0])
        text_rate = vitb.get("text_trimmed_per_s") or vitb["text_full_context_per_s"]
        lines += [
            "",
            f"Measured on one {gpu['device']} (`bench/gpu_rates.py`, torch {gpu['torch']}, random weights, inputs "
            f"on the GPU): CRAFT at {craft['size'][1]}x{craft['size'][0]} {craft['precision']}: "
            f"{craft['image_per_s']:.0f} images/s; CLIP {vitb['model']} {vitb['precision']}: image tower "
            f"{vitb['image_per_s']:.0f}/s, text tower {text_rate:.0f}/s (trimmed to the caption).",
        ]
        gpu_s = (1 + RECOGNITION_OVER_DETECTION) / craft["image_per_s"] + MASKED_FORWARDS / vitb["image_per_s"] \
            + 1 / text_rate
        host = [v for v in (decode, ocr_host, clip_host, parrot) if v is not None]
        host_s = sum(host) / VCPU_PER_CORE_HERE if len(host) == 4 else None
        gpu_hours = SAMPLES * gpu_s / GPU_BUSY / 3600
        rows = [("OCR + CLIP forwards", f"{gpu_s * 1e3:.2f} ms GPU / sample, {GPU_BUSY:.0%} busy",
                 f"{gpu_hours:,.0f} GPU-h", gpu_hours * GPU_HOUR_USD)]
        if host_s is not None:
            vcpu_hours = SAMPLES * host_s / 3600
            node_vcpus = GPUS_PER_NODE * VCPUS_PER_GPU
            # the GPU node's own vCPUs do the host work: a node is limited by whichever runs out first
            node_hours_gpu = gpu_hours / GPUS_PER_NODE
            node_hours_cpu = vcpu_hours / node_vcpus
            bound = "GPU" if node_hours_gpu >= node_hours_cpu else "host CPU"
            node_hours = max(node_hours_gpu, node_hours_cpu)
            rows[0] = ("OCR + CLIP on 8-GPU nodes", f"{gpu_s * 1e3:.2f} ms GPU + {host_s * 1e3:.0f} ms vCPU / sample",
                       f"{node_hours:,.0f} node-h ({bound}-bound)", node_hours * GPUS_PER_NODE * GPU_HOUR_USD)
        dl_core_hours = SAMPLES / (DOWNLOAD_PER_16_CORES / 16) / 3600
        rows.append(("download (img2dataset, CPU nodes)", f"{DOWNLOAD_PER_16_CORES:.0f} samples/s per 16 vCPUs",
                     f"{dl_core_hours:,.0f} vCPU-h", dl_core_hours * CPU_VCPU_HOUR_USD))
        if reshard_mb_s:
            rs_hours = SAMPLES * bytes_per_sample / 1e6 / reshard_mb_s / 3600
            rows.append(("reshard (CPU)", f"{reshard_mb_s:.0f} MB/s per core", f"{rs_hours:,.0f} vCPU-h",
                         rs_hours * CPU_VCPU_HOUR_USD))
        if duck:
            d = duck.data
            n = len(d["catalog"])
            per_policy = max(v["median_s"] for v in d["catalog"].values()) * SAMPLES / d["rows"]
            rows.append((f"DuckDB policies ({n}, select_policies)", f"{per_policy:.0f} s per policy at 100M on "
                         f"{d['threads']} cores (linear from {d['rows'] / 1e6:g}M)",
                         f"{n * per_policy / 3600 * d['threads']:.1f} vCPU-h",
                         n * per_policy / 3600 * d["threads"] * CPU_VCPU_HOUR_USD))
        storage_tb = SAMPLES * bytes_per_sample / 1e12
        total = sum(r[3] for r in rows)
        lines += [
            "",
            "| step | rate used | 100M samples | cost (USD) |",
            "|---|---|---:|---:|",
            *[f"| {a} | {b} | {c} | {d:,.0f} |" for a, b, c, d in rows],
            f"| **total compute** | | | **{total:,.0f}** |",
            "",
            f"Storage: {storage_tb:.1f} TB of shards (source) plus what each policy keeps, "
            f"~{storage_tb * 1000 * STORAGE_GB_MONTH_USD:,.0f} USD per month at {STORAGE_GB_MONTH_USD} USD/GB-month.",
        ]
    else:
        lines += ["", "No GPU rates (`bench/results/gpu_rates.json`): run `bench/gpu_rates.py` on a CUDA machine."]
    if rapid is not None and clip_cpu is not None and decode is not None:
        cpu_only = rapid + clip_cpu + decode + (parrot or 0)
        core_hours = SAMPLES * cpu_only / 3600
        text = (f"For scale, on CPUs alone at this machine's rates with the DAG benchmark's models (rapidocr and CLIP "
                f"{dag.data['config']['clip']['model']}, smaller than the ViT-B-32 above; {cpu_only:.3f} CPU-s per "
                f"sample): {core_hours:,.0f} core-hours, ~{core_hours * CPU_VCPU_HOUR_USD:,.0f} USD at "
                f"{CPU_VCPU_HOUR_USD} USD/vCPU-hour")
        if easy_cpu:
            text += f"; easyocr instead of rapidocr costs {easy_cpu / rapid:.0f}x rapidocr's CPU time per image"
        lines += ["", text + "."]
    lines += [
        "",
        "Assumptions (constants in `bench/cost.py`): "
        f"{GPU_HOUR_USD} USD per H100-hour, {GPUS_PER_NODE}-GPU nodes with {VCPUS_PER_GPU} vCPUs per GPU, a vCPU "
        f"there does a core's work here; GPUs {GPU_BUSY:.0%} busy in the streaming DAG; easyocr recognition costs "
        f"{RECOGNITION_OVER_DETECTION:.0%} of CRAFT on the GPU (not measured); {MASKED_FORWARDS} image forwards per "
        f"sample (measured ~1.5 on the embedded set: about half the images have text); download at "
        f"{DOWNLOAD_PER_16_CORES:.0f} samples/s per 16-vCPU node (network-bound, not measured here), "
        f"{CPU_VCPU_HOUR_USD} USD per vCPU-hour; images at the pipeline's default 512 px. Not included: "
        "engineering time, egress, retries, training.",
    ]
    return "\n".join(lines)
