"""The slim install (no `local` extra: no torch, numpy or safetensors) serves a remote-only
config: a real `gateway serve` whose interpreter refuses to import them, driven with the SDK;
at exit it reports whether any of them is in sys.modules."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import openai

from tests.e2e.scale.conftest import ENV
from tests.e2e.scale.counting_upstream import CountingUpstream
from tests.server import ACME_SHA, gateway_process

# Runs `gateway serve` with torch, numpy and safetensors made unimportable, as on an image
# without them; prints what of them sys.modules holds once the server has stopped.
SLIM = """#!{python}
import sys
BLOCKED = ("torch", "numpy", "safetensors")
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed in the slim image")
        return None
sys.meta_path.insert(0, Refuse())
from gateway.cli import main
code = main(sys.argv[3:])  # called as `slim.py -m gateway.cli serve ...`
print("HEAVY MODULES:", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED), flush=True)
sys.exit(code)
"""


def test_slim_install_serves_remote_tiers_without_torch(tmp_path: Path) -> None:
    wrapper = tmp_path / "slim.py"
    wrapper.write_text(SLIM.replace("{python}", sys.executable))
    wrapper.chmod(0o755)
    with CountingUpstream().running() as up:
        cfg = {
            "server": {"admin_api_key_env": "GATEWAY_ADMIN_KEY"},
            "backends": {"hosted": {"kind": "openai", "url": up.url},
                         "gpu": {"kind": "vllm", "url": up.url, "kv_budget_bytes": "1MiB"}},
            "models": [{"name": "hosted", "backend": "hosted"}, {"name": "large", "backend": "gpu"}],
            "tenants": [{"name": "acme", "api_key_sha256": [ACME_SHA], "models": ["hosted", "large"],
                         "limits": {"tokens_per_minute": 100000}}],
        }
        # the wrapper stands in for the interpreter
        with gateway_process(cfg, tmp_path, env=ENV, python=str(wrapper)) as (url, proc):
            client = openai.OpenAI(base_url=url, api_key="sk-demo-acme", max_retries=0)
            for model in ("hosted", "large"):
                reply = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
                assert reply.choices[0].message.content == "hi"
                parts = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi"}], stream=True)
                assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == "hi"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    assert "HEAVY MODULES: []" in (tmp_path / "gateway.log").read_text()
