"""Latency of one ROSA turn served by vLLM with the plugin, against the in-process transformers loop, in one run.

Run in the vLLM venv (``~/.cache/rosa-ext/vllm-venv``; ``benchmarks/serving/setup_and_test.sh`` builds it):

    OMP_NUM_THREADS=1 python benchmarks/serving/bench_latency.py --out benchmarks/results

SmolLM2-135M-Instruct (float32, written as an HF folder outside the repository), one torch thread on
each side, greedy answers of exactly ``--new`` tokens (end-of-sequence ignored), ``--turns`` measured
turns per mode after one warm-up turn, medians reported:

- **in-process** (transformers + rosa-ext session): ``session.generate`` (recording the lm_head inputs)
  then ``session.update(reward=...)`` -- the new state is live when ``update`` returns;
- **vLLM + plugin** (``python -m rosa_ext.integrations.vllm_serve``, its own server processes): a
  completion with ``rosa_user`` / ``rosa_record`` (the answer), then ``POST /rosa/feedback`` -- the new
  state is live when the reply arrives (the step and the store write happen before it; the next request
  is admitted after it). The ROSA step alone is the server's own timing of ``rosa_update`` (``step_ms``);
- **generation, plugin on vs off**: the same completion on a plain vLLM server (same options, no
  plugin) vs on the plugin server for a user with a state (applied and recorded), and for a request
  without a user (those two alternate); the plain server runs after the plugin server (both up at once
  skewed the comparison on a shared machine).

Targets (issue "Learn where you serve"): feedback -> new state live <= 1.5x the ROSA step alone;
generation with the plugin on within 1.1x of the plugin off. ``--out DIR`` writes
``serving_latency_<date>.json`` and ``.md`` (machine, commit, date, every number).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
import common  # noqa: E402
import torch  # noqa: E402

import rosa_ext  # noqa: E402


class Server:
    def __init__(self, model_dir: str, log: Path, plugin: bool, store: Optional[str], extra_env: Dict[str, str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_dir = model_dir
        env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_CPU_KVCACHE_SPACE="1",
                   **extra_env)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        common_args = ["--model", model_dir, "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4",
                       "--enforce-eager", "--port", str(self.port)]
        if plugin:
            cmd = [sys.executable, "-m", "rosa_ext.integrations.vllm_serve", "--rosa-store", store] + common_args
        else:
            env.pop("ROSA_VLLM_CONFIG", None)
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1"] + common_args
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < 600:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {log}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    self.startup_s = time.time() - t0
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"server did not start; see {log}")

    def call(self, method: str, path: str, body: Any = None) -> Any:
        req = urllib.request.Request(self.url + path, data=None if body is None else json.dumps(body).encode(),
                                     method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def complete(self, prompt: List[int], new: int, user: Optional[str] = None, record: bool = False) -> Any:
        body = {"model": self.model_dir, "prompt": prompt, "max_tokens": new, "min_tokens": new, "ignore_eos": True,
                "temperature": 0}
        if user is not None:
            body["vllm_xargs"] = {"rosa_user": user, **({"rosa_record": True} if record else {})}
        out = self.call("POST", "/v1/completions", body)
        assert out["usage"]["completion_tokens"] == new, out["usage"]
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


def _med(xs: List[float]) -> float:
    return float(statistics.median(xs))


def in_process(model_dir: str, prompt: List[int], new: int, turns: int) -> Dict[str, Any]:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    out: Dict[str, Any] = {}
    ids = torch.tensor([prompt])
    for mode in ("hidden", "lora"):
        s = rosa_ext.attach(model, mode=mode)
        gen, upd = [], []
        for t in range(turns + 1):
            t0 = time.perf_counter()
            s.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            t1 = time.perf_counter()
            s.update(reward=-1.0 if t % 2 == 0 else 1.0)
            t2 = time.perf_counter()
            if t:  # the first turn warms up
                gen.append(t1 - t0)
                upd.append(t2 - t1)
        s.detach()
        out[mode] = {"generate_s": _med(gen), "feedback_to_live_s": _med(upd), "generate_all_s": gen, "update_all_s": upd}
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def served(model_dir: str, prompt: List[int], new: int, turns: int, work: Path, ep: Optional[str]) -> Dict[str, Any]:
    env = {} if ep is None else {"PYTHONPATH": ep + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res: Dict[str, Any] = {}
    # One server at a time: with both up at once, the plain server measured ~1.4x slower than the plugin
    # server on this shared machine, for requests that run the same code (process placement, not the
    # plugin), so the two are measured one after the other; inside the plugin server, requests with and
    # without a user alternate.
    srv = Server(model_dir, work / "plugin.log", plugin=True, store=str(work / "users.sqlite"), extra_env=env)
    try:
        res["plugin_server_startup_s"] = srv.startup_s
        for mode in ("hidden", "lora"):
            user = f"bench-{mode}"
            srv.call("POST", f"/rosa/users/{user}/reset", {"mode": mode})
            gen, fb, step = [], [], []
            for t in range(turns + 1):
                t0 = time.perf_counter()
                rid = srv.complete(prompt, new, user, record=True)["id"]
                t1 = time.perf_counter()
                out = srv.call("POST", "/rosa/feedback", {"user": user, "request_id": rid,
                                                          "reward": -1.0 if t % 2 == 0 else 1.0})
                t2 = time.perf_counter()
                if t:
                    gen.append(t1 - t0)
                    fb.append(t2 - t1)
                    step.append(out["step_ms"] / 1000.0)
            res[mode] = {"generate_s": _med(gen), "feedback_to_live_s": _med(fb), "step_alone_s": _med(step),
                         "feedback_over_step": _med(fb) / _med(step), "generate_all_s": gen, "feedback_all_s": fb,
                         "step_all_s": step, "solver": out["solver"]}
        gen_user, gen_base = [], []
        for _ in range(turns * 2):  # a user with a state (applied and recorded), then a request without a user
            gen_user.append(_timed(lambda: srv.complete(prompt, new, "bench-hidden", record=True)))
            gen_base.append(_timed(lambda: srv.complete(prompt, new)))
    finally:
        srv.stop()
    plain = Server(model_dir, work / "plain.log", plugin=False, store=None, extra_env=env)
    try:
        res["plain_server_startup_s"] = plain.startup_s
        for _ in range(2):
            plain.complete(prompt, new)
        gen_off = [_timed(lambda: plain.complete(prompt, new)) for _ in range(turns * 2)]
    finally:
        plain.stop()
    res["generation_min"] = {"plugin_off_s": min(gen_off), "plugin_on_user_s": min(gen_user),
                             "plugin_on_no_user_s": min(gen_base), "on_user_over_off": min(gen_user) / min(gen_off),
                             "on_user_over_no_user": min(gen_user) / min(gen_base)}
    for mode in ("hidden", "lora"):
        res[mode]["feedback_over_step_min"] = min(res[mode]["feedback_all_s"]) / min(res[mode]["step_all_s"])
    res["generation"] = {"plugin_off_s": _med(gen_off), "plugin_on_user_s": _med(gen_user),
                         "plugin_on_no_user_s": _med(gen_base), "on_user_over_off": _med(gen_user) / _med(gen_off),
                         "on_no_user_over_off": _med(gen_base) / _med(gen_off),
                         "on_user_over_no_user": _med(gen_user) / _med(gen_base), "off_all_s": gen_off,
                         "on_user_all_s": gen_user, "on_no_user_all_s": gen_base}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new", type=int, default=32, help="tokens per answer")
    ap.add_argument("--turns", type=int, default=5, help="measured turns per mode (after one warm-up turn)")
    ap.add_argument("--model-dir", default=None, help="SmolLM2 HF folder (default: written to a temporary folder)")
    ap.add_argument("--out", default=None, help="folder for serving_latency_<date>.json/.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="rosa-serving-bench-"))
    model_dir = args.model_dir
    if model_dir is None:
        from rosa_ext.integrations.hf_folder import smollm2_hf_folder
        model_dir = str(smollm2_hf_folder(work / "smollm2-hf"))
    import transformers as tf
    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    p = tok.apply_chat_template([{"role": "user", "content": "Name a colour of the sky."}], add_generation_prompt=True,
                                tokenize=True, return_dict=False)
    prompt = list(p["input_ids"]) if isinstance(p, dict) else list(p)
    from importlib.metadata import entry_points
    ep = None
    if not any(e.name == "rosa" for e in entry_points(group="vllm.general_plugins")):
        # an install that predates the plugin's entry points: provide them for this run (as the test does)
        info = work / "ep" / "rosa_ext_vllm_plugins-0.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rosa-ext-vllm-plugins\nVersion: 0.0\n")
        (info / "entry_points.txt").write_text("[vllm.general_plugins]\nrosa = rosa_ext.integrations.vllm_plugin:register\n\n"
                                               "[vllm.endpoint_plugins]\nrosa = rosa_ext.integrations.vllm_plugin:RosaEndpoints\n")
        ep = str(work / "ep")
    load0 = os.getloadavg()
    t0 = time.time()
    local = in_process(model_dir, prompt, args.new, args.turns)
    vllm_res = served(model_dir, prompt, args.new, args.turns, work, ep)
    import vllm
    result = {"date": common.utc_now(), "commit": common.commit(), "machine": common.cpu_name(), "cores": os.cpu_count(),
              "load_average_start": load0, "load_average_end": os.getloadavg(), "torch_threads": 1,
              "versions": {**common.versions(), "vllm": vllm.__version__},
              "model": "SmolLM2-135M-Instruct float32", "prompt_tokens": len(prompt), "new_tokens": args.new,
              "turns": args.turns, "in_process": local, "vllm_plugin": vllm_res, "wall_s": time.time() - t0}
    print(json.dumps({k: v for k, v in result.items() if k not in ("in_process", "vllm_plugin")}, indent=1))
    md = _markdown(result)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        day = result["date"][:10]
        (out / f"serving_latency_{day}.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / f"serving_latency_{day}.md").write_text(md)


def _markdown(r: Dict[str, Any]) -> str:
    loc, srv = r["in_process"], r["vllm_plugin"]
    g, m = srv["generation"], srv["generation_min"]
    lines = [f"# One ROSA turn: vLLM + plugin vs the in-process transformers loop ({r['date']})", "",
             f"Machine: {r['machine']}, {r['cores']} cores (shared; load average {r['load_average_start'][0]:.2f} at the "
             f"start, {r['load_average_end'][0]:.2f} at the end), 1 torch thread on each side; commit {r['commit']}; "
             f"vllm {r['versions']['vllm']}, torch {r['versions'].get('torch')}. {r['model']}, prompt "
             f"{r['prompt_tokens']} tokens, greedy answers of exactly {r['new_tokens']} tokens; medians of {r['turns']} "
             "turns after a warm-up turn (minima below). Produced by `benchmarks/serving/bench_latency.py` (both loops in this one run).",
             "", "| mode | loop | generate (s) | feedback -> new state live (s) | ROSA step alone (s) | live / step |",
             "|---|---|---|---|---|---|"]
    for mode in ("hidden", "lora"):
        lo, sv = loc[mode], srv[mode]
        lines.append(f"| {mode} | in-process (transformers session) | {lo['generate_s']:.3f} | {lo['feedback_to_live_s']:.3f} "
                     "| (the update is the step) | - |")
        lines.append(f"| {mode} | vLLM + plugin (HTTP) | {sv['generate_s']:.3f} | {sv['feedback_to_live_s']:.3f} | "
                     f"{sv['step_alone_s']:.3f} ({sv['solver']}) | {sv['feedback_over_step']:.2f} |")
    lines += ["", "Generation on the vLLM servers (same options, one server after the other; median, s):", "",
              "| plugin off (plain vLLM) | plugin on, user with a state (applied + recorded) | plugin on, no user | "
              "on (user) / off | on (no user) / off | on: user / no user (alternating) |", "|---|---|---|---|---|---|",
              f"| {g['plugin_off_s']:.3f} | {g['plugin_on_user_s']:.3f} | {g['plugin_on_no_user_s']:.3f} | "
              f"{g['on_user_over_off']:.3f} | {g['on_no_user_over_off']:.3f} | {g['on_user_over_no_user']:.3f} |", "",
              "Minima (other processes on a shared machine only ever add time, so the fastest repeat is the least "
              f"disturbed): generation off {m['plugin_off_s']:.3f} s, on (user) {m['plugin_on_user_s']:.3f} s, on (no "
              f"user) {m['plugin_on_no_user_s']:.3f} s: on (user) / off {m['on_user_over_off']:.3f}, user / no user "
              f"{m['on_user_over_no_user']:.3f}; feedback -> live / step: hidden {srv['hidden']['feedback_over_step_min']:.2f}, "
              f"lora {srv['lora']['feedback_over_step_min']:.2f}.", "",
              f"Server start-up: plain {srv['plain_server_startup_s']:.0f} s, plugin {srv['plugin_server_startup_s']:.0f} s. "
              "Targets: live / step <= 1.5; on / off <= 1.1.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
