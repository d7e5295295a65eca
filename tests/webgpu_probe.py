"""Run an EXPORT DIR's graphs on WebGpuExecutionProvider and on the CPU provider; print JSON.

    .venv-webgpu/bin/python tests/webgpu_probe.py EXPORT_DIR

Runs in the separate onnxruntime-webgpu venv (scripts/setup_webgpu.sh), so it needs only
what the device runtime needs (numpy, onnxruntime, tokenizers, Pillow; the runtime is imported
from this checkout). Node placement comes from onnxruntime's profiler: every node event
names the execution provider that ran it. Then the runtime's greedy generations on WebGPU
(KV cache in device memory, and in host memory) and on CPU. Prints {"skip": reason} when no
WebGPU adapter can be created here.
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
            out[i["name"]] = rng.standard_normal(shape).astype(np.float32)
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
    about two noise images) on WebGPU with the KV cache in device memory, on WebGPU with it in
    host memory, and on CPU; and the WebGPU runtime's own multi-token check (prefill_fault),
    or the error it stopped with."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from agevlm_edge.errors import BadInput
    from agevlm_edge.runtime.session import GenerationConfig, Runtime

    out, res = {}, {}
    for key, kw in (("webgpu_kv_device", {"provider": "webgpu"}),
                    ("webgpu_kv_host", {"provider": "webgpu", "kv_on_device": False}),
                    ("cpu", {"provider": "cpu"})):
        try:
            rt = Runtime(d, **kw)
        except BadInput as e:
            res["runtime_error"] = str(e)
            continue
        if key == "webgpu_kv_device":
            res["prefill_fault"] = rt.prefill_fault
        images = [np.random.default_rng(i).integers(0, 256, (3, rt.image_size, rt.image_size),
                                                    dtype=np.uint8) for i in range(2)]
        prompts = [rt.prompt_ids("Caption:"),
                   rt.prompt_ids("Is there a red cube to the left of the blue ball in the image? "
                                 "Answer yes or no.")]
        out[key] = rt.generate(rt.encode_images(images), prompts, GenerationConfig(max_new_tokens=8)).ids
    return {**res, "generations": out}


if __name__ == "__main__":
    main()
