"""Run an EXPORT DIR's graphs on WebGpuExecutionProvider and on the CPU provider; print JSON.

    .venv-webgpu/bin/python tests/webgpu_probe.py EXPORT_DIR

Runs in the separate onnxruntime-webgpu venv (scripts/setup_webgpu.sh), so it needs only
what the device runtime needs (numpy, onnxruntime, tokenizers, Pillow; the runtime is imported
from this checkout). Node placement comes from onnxruntime's profiler: every node event
names the execution provider that ran it. Then the runtime's greedy generations on WebGPU
(KV cache in device memory, appended to in place where the export allows it and copied into a
grown tensor every step; and in host memory) and on CPU, and the in-place cache's decode steps
against the grown copy's (``inplace_steps``). Prints {"skip": reason} when no WebGPU adapter
can be created here.
"""

import glob
import json
import os
import sys
import tempfile

import numpy as np
import onnxruntime as ort

# Decoder feeds in two cases: a decode step (one new token over 11 cached ones) and a prefill
# (12 new tokens, empty cache; a concat decoder also takes 4 image rows then). Both go beyond
# 8 keys: onnxruntime's WebGPU flash-attention prefill kernel is wrong there on this adapter
# (scripts/probe_webgpu_mha.py), its one-token decode kernels are right.
CASES = {"decode": {"batch": 1, "seq": 1, "past": 11, "image_tokens": 0},
         "prefill": {"batch": 1, "seq": 12, "past": 0, "image_tokens": 4}}


def feeds_for(graph: dict, vocab: int, rng, dims: dict) -> dict:
    names = {i["name"] for i in graph["inputs"]}
    dims = {**dims, "keys": dims["past"] + dims["seq"]
            + (dims["image_tokens"] if "image_embeds" in names else 0)}
    out = {}
    for i in graph["inputs"]:
        shape = [dims.get(d, d) if isinstance(d, str) else d for d in i["shape"]]
        if i["name"] == "input_ids":
            out[i["name"]] = rng.integers(3, vocab, shape).astype(np.int64)
        elif i["dtype"] == "int64":
            out[i["name"]] = np.ones(shape, np.int64)
        else:
            out[i["name"]] = rng.standard_normal(shape).astype(i["dtype"])   # an fp16 KV cache too
    return out


def compare(names, a, b) -> dict:
    res = {"outputs": {n: {"max_abs_diff": float(np.abs(x - y).max()),
                           "ref_abs_max": float(np.abs(y).max())} for n, x, y in zip(names, a, b)}}
    if "logits" in names:
        x, y = a[names.index("logits")], b[names.index("logits")]
        res["top1_agreement"] = float((x.argmax(-1) == y.argmax(-1)).mean())
    return res


def main() -> None:
    d = sys.argv[1]
    man = json.load(open(os.path.join(d, "manifest.json")))
    if "WebGpuExecutionProvider" not in ort.get_available_providers():
        print(json.dumps({"skip": f"onnxruntime {ort.__version__} here has no WebGpuExecutionProvider"}))
        return
    rng = np.random.default_rng(0)
    res = {"onnxruntime": ort.__version__, "graphs": {}}
    tmp = tempfile.mkdtemp()
    for name in ("vision", "decoder"):
        path = os.path.join(d, f"{name}.onnx")
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, name)
        try:
            gpu = ort.InferenceSession(path, so, providers=["WebGpuExecutionProvider", "CPUExecutionProvider"])
        except Exception as e:                      # no adapter (no Vulkan driver), etc.
            print(json.dumps({"skip": f"no WebGPU session here: {str(e).splitlines()[0]}"}))
            return
        cpu = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [o.name for o in cpu.get_outputs()]
        cases = {}
        for case, dims in (CASES.items() if name == "decoder" else [("image", CASES["decode"])]):
            feeds = feeds_for(man["graphs"][name], int(man["model"]["vocab_size"]), rng, dims)
            cases[case] = compare(names, gpu.run(None, feeds), cpu.run(None, feeds))
        gpu.end_profiling()
        events = json.load(open(sorted(glob.glob(os.path.join(tmp, f"{name}*.json")))[-1]))
        placement = {}
        for ev in events:
            args = ev.get("args", {})
            if ev.get("cat") == "Node" and "provider" in args and ev["name"].endswith("_kernel_time"):
                placement[ev["name"][: -len("_kernel_time")]] = (args["op_name"], args["provider"])
        # "outputs" (and "top1_agreement"): the decode step for the decoder, else the one case
        main_case = cases.pop("decode" if name == "decoder" else "image")
        res["graphs"][name] = {**main_case, **cases, "placement": placement}
    res.update(generations(d))
    print(json.dumps(res))


def generations(d: str) -> dict:
    """Greedy tokens of the device runtime (two left-padded prompts, one longer than 8 tokens,
    about two noise images) on WebGPU with the KV cache in device memory (in place where the
    export allows it, and a grown copy per step), on WebGPU with it in host memory, and on
    CPU; the WebGPU runtime's own multi-token check (prefill_fault) and its in-place decode
    steps (``inplace_steps``), or the error it stopped with."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from agevlm_edge.errors import BadInput
    from agevlm_edge.runtime.session import GenerationConfig, Runtime

    out, res, rts = {}, {}, {}
    for key, kw in (("webgpu_kv_device", {"provider": "webgpu"}),
                    ("webgpu_kv_grown", {"provider": "webgpu", "kv_inplace": False}),
                    ("webgpu_kv_host", {"provider": "webgpu", "kv_on_device": False}),
                    ("cpu", {"provider": "cpu"})):
        try:
            rts[key] = rt = Runtime(d, **kw)
        except BadInput as e:
            res["runtime_error"] = str(e)
            continue
        if key == "webgpu_kv_device":
            res["prefill_fault"] = rt.prefill_fault
            res["kv_inplace"] = rt.kv_inplace
        out[key] = rt.generate(rt.encode_images(noise_images(rt)), prompts_of(rt),
                               GenerationConfig(max_new_tokens=8)).ids
    if rts.get("webgpu_kv_device") and rts["webgpu_kv_device"].kv_inplace:
        res["inplace_steps"] = inplace_steps(rts["webgpu_kv_device"], rts["webgpu_kv_grown"])
    return {**res, "generations": out}


def noise_images(rt) -> list:
    return [np.random.default_rng(i).integers(0, 256, (3, rt.image_size, rt.image_size),
                                              dtype=np.uint8) for i in range(2)]


def prompts_of(rt) -> list:
    return [rt.prompt_ids("Caption:"),
            rt.prompt_ids("Is there a red cube to the left of the blue ball in the image? "
                          "Answer yes or no.")]


def inplace_steps(rt, ref) -> dict:
    """Six decode steps of the in-place cache (room for 3 past the prompt, so it grows at the
    4th) against the grown copy's: logits compared, and per step the cache's capacity and
    whether the step handed back the very buffers it was given (``kept``)."""
    state = rt.encode_images(noise_images(rt))
    seqs = prompts_of(rt)
    T = max(map(len, seqs))
    logits_of, caps, kept = [], [], []
    for r, reserve in ((rt, T + 3), (ref, 0)):
        ids, keys, logits, past, _ = r.prefill(state, seqs, want_probs=False, reserve=reserve)
        steps = [logits[:, -1]]
        for _ in range(6):
            keys = np.concatenate([keys, np.ones((len(seqs), 1), np.int64)], 1)
            before = dict(past)
            logits, past, _ = r.step(logits[:, -1].argmax(-1)[:, None], keys, past, state,
                                     prefill=False, want_probs=False)
            steps.append(logits[:, -1])
            if r is rt:
                caps.append(past["past_key_0"].shape()[2])
                kept.append(all(past[n] is before[n] for n in past))
        logits_of.append(np.stack(steps))
    return {"prompt_keys": T, "capacity": caps, "kept": kept,
            "max_abs_diff": float(np.abs(logits_of[0] - logits_of[1]).max()),
            "ref_abs_max": float(np.abs(logits_of[1]).max())}


if __name__ == "__main__":
    main()
