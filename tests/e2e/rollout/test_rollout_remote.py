"""Rollouts through a real `gateway serve` in front of two `openai` upstreams (primary and
candidate), driven by the official SDK: sticky sides, automatic advance, automatic rollback
on a candidate that fails a share of requests or is slow, the operator's routes (admin key
only), and the stage kept across a SIGHUP reload, a restart, and two gateways on one Redis."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.rollout.conftest import (
    ADMIN,
    ENV,
    act,
    base,
    chat,
    remote_config,
    rollout,
    sdk,
    wait_for,
)
from tests.e2e.rollout.upstream import RolloutUpstream
from tests.server import gateway_process, metric, running_gateway


def test_the_same_user_stays_on_one_side_across_100_requests(tmp_path: Path) -> None:
    with RolloutUpstream("from primary").running() as p, \
            RolloutUpstream("from candidate").running() as c:
        cfg = remote_config(p.url, c.url, stage="canary", canary_steps=[0.5], auto=False,
                            shadow_share=0.0)
        with running_gateway(cfg, tmp_path, env=ENV) as url:
            client = sdk(url)
            sides: dict[str, set[str | None]] = {}
            for i in range(100):
                user = f"user-{i % 20}"
                text, side = chat(client, user)
                assert text == f"from {side}"  # the header names the side that answered
                sides.setdefault(user, set()).add(side)
            assert all(len(s) == 1 for s in sides.values())
            assert {next(iter(s)) for s in sides.values()} == {"primary", "candidate"}
            assert p.requests + c.requests == 100  # no shadow copies: shadow_share 0
            on_candidate = sum(1 for s in sides.values() if s == {"candidate"})
            assert c.requests == 5 * on_candidate
            # a stream says its side too
            stream = client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                user="user-0")
            assert stream.headers["x-gateway-rollout"] == next(iter(sides["user-0"]))
            assert "".join(ch.choices[0].delta.content or "" for ch in stream.parse()
                           if ch.choices) == f"from {next(iter(sides['user-0']))}"


def test_a_healthy_candidate_walks_shadow_canary_steps_full(tmp_path: Path) -> None:
    with RolloutUpstream().running() as p, RolloutUpstream().running() as c:
        cfg = remote_config(p.url, c.url, stage="shadow", shadow_share=1.0,
                            canary_steps=[0.5, 1.0], window_requests=6,
                            promote_after_windows=1, guards={"max_ttft_p95_ratio": 1000})
        with running_gateway(cfg, tmp_path, env=ENV) as url:
            client = sdk(url)
            seen = ["shadow"]
            for i in range(400):
                chat(client, f"u{i % 30}", temperature=0)
                state = rollout(url)
                label = state["stage"] + (f"[{state['step']}]" if state["step"] is not None else "")
                if label != seen[-1]:
                    seen.append(label)
                if state["stage"] == "full":
                    break
            assert seen == ["shadow", "canary[0]", "canary[1]", "full"]
            history = rollout(url)["history"]
            assert [(h["action"], h["reason"]) for h in history] == \
                [("start", "config")] + [("advance", "promoted")] * 3
            assert history[1]["figures"]["agreement"] == 1.0
            assert rollout(url)["report"]["exact_match"] == 1.0
            text = httpx.get(base(url) + "/metrics").text
            assert metric(text, "gateway_rollout_stage", model="m") == 3
            assert metric(text, "gateway_rollout_moves_total", action="advance",
                          reason="promoted") == 3
            assert metric(text, "gateway_shadow_requests_total", outcome="compared") >= 6
            _, side = chat(client, "anyone")
            assert side == "candidate"


@pytest.mark.parametrize("fault", ["errors", "slow"])
def test_a_bad_candidate_is_rolled_back_and_clients_never_see_it(tmp_path: Path,
                                                                  fault: str) -> None:
    bad = RolloutUpstream(fail_every=3) if fault == "errors" else RolloutUpstream(delay_s=1.0)
    with RolloutUpstream().running() as p, bad.running() as c:
        cfg = remote_config(p.url, c.url, stage="canary", shadow_share=0.0,
                            canary_steps=[0.5, 1.0], window_requests=6,
                            guards={"max_ttft_p95_ratio": 5.0})
        with running_gateway(cfg, tmp_path, env=ENV) as url:
            client = sdk(url)
            for i in range(200):
                text, _ = chat(client, f"u{i % 20}")
                assert text == "the same answer"  # a failed candidate fell back to the primary
                if rollout(url)["stage"] == "rolled_back":
                    break
            state = rollout(url)
            assert state["stage"] == "rolled_back" and state["share"] == 0.0
            move = state["history"][-1]
            assert move["action"] == "rollback" and move["from"] == "canary[0]"
            assert move["reason"] == ("error_rate" if fault == "errors" else "ttft")
            assert move["figures"]["candidate_requests"] == 6
            if fault == "errors":
                # the failing upstream is out of rotation for a while (the openai backend's
                # cooldown): the candidate's requests then fail at once, and count too
                assert c.failed >= 1 and move["figures"]["candidate_errors"] >= c.failed
            text = httpx.get(base(url) + "/metrics").text
            assert metric(text, "gateway_rollout_moves_total", action="rollback",
                          reason=move["reason"]) == 1
            assert metric(text, "gateway_rollout_stage", model="m") == -1
            before = c.requests
            sides = {chat(client, f"u{i}")[1] for i in range(20)}
            assert sides == {"primary"} and c.requests == before


def test_admin_routes_refuse_tenant_keys_and_move_the_rollout(tmp_path: Path) -> None:
    with RolloutUpstream().running() as p, RolloutUpstream().running() as c:
        cfg = remote_config(p.url, c.url, stage="shadow", auto=False, shadow_share=0.0)
        with running_gateway(cfg, tmp_path, env=ENV) as url:
            b = base(url)
            for key in ("sk-demo-acme", "sk-demo-globex", None):
                headers = {"authorization": f"Bearer {key}"} if key else {}
                r = httpx.get(b + "/admin/rollouts", headers=headers)
                assert r.status_code == 401 and r.json()["error"]["message"]
                r = httpx.post(b + "/admin/rollouts/m", json={"action": "promote"}, headers=headers)
                assert r.status_code == 401
            assert rollout(url)["stage"] == "shadow"  # nothing moved
            bad = act(url, "explode")
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "action"
            assert act(url, "advance", model="nope").status_code == 404
            assert act(url, "pause").json()["paused"] is True
            assert act(url, "pause").status_code == 409
            assert act(url, "resume").json()["paused"] is False
            moved = act(url, "advance").json()
            assert (moved["stage"], moved["step"], moved["share"]) == ("canary", 0, 0.01)
            assert act(url, "rollback").json()["stage"] == "rolled_back"
            assert act(url, "rollback").status_code == 409
            assert act(url, "promote").json()["stage"] == "full"
            reasons = [(h["action"], h["reason"]) for h in rollout(url)["history"]]
            assert reasons[1:] == [("pause", "operator"), ("resume", "operator"),
                                   ("advance", "operator"), ("rollback", "operator"),
                                   ("promote", "operator")]


def test_stage_survives_sighup_reload_and_restart(tmp_path: Path) -> None:
    with RolloutUpstream().running() as p, RolloutUpstream().running() as c:
        cfg = remote_config(p.url, c.url, stage="shadow", auto=False, shadow_share=0.0,
                            canary_steps=[0.1, 0.5, 1.0])
        cfg["server"]["state_dir"] = str(tmp_path / "state")
        with gateway_process(cfg, tmp_path, env=ENV) as (url, proc):
            act(url, "advance")
            act(url, "advance")
            assert (rollout(url)["stage"], rollout(url)["step"]) == ("canary", 1)
            changed = copy.deepcopy(cfg)  # another window size and starting stage, same candidate
            changed["models"][0]["rollout"].update(window_requests=7, stage="off")
            (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(changed))
            proc.send_signal(signal.SIGHUP)
            wait_for("the reload", lambda: rollout(url)["window"]["window_requests"] == 7)
            assert (rollout(url)["stage"], rollout(url)["step"]) == ("canary", 1)
        with running_gateway(cfg, tmp_path, env=ENV) as url:  # a restart: the saved stage wins
            state = rollout(url)
            assert (state["stage"], state["step"], state["share"]) == ("canary", 1, 0.5)
        other = copy.deepcopy(cfg)  # a new candidate starts at the config's stage
        other["backends"]["candidate2"] = dict(other["backends"]["candidate"])
        other["models"][0]["rollout"]["candidate"] = "candidate2"
        with running_gateway(other, tmp_path, env=ENV) as url:
            state = rollout(url)
            assert (state["stage"], state["candidate"]) == ("shadow", "candidate2")


def test_two_gateways_sharing_redis_agree_on_the_stage(tmp_path: Path) -> None:
    from tests.redis_server import RedisServer

    redis = RedisServer(tmp_path)
    redis.start()
    try:
        with RolloutUpstream().running() as p, RolloutUpstream().running() as c:
            cfg = remote_config(p.url, c.url, stage="shadow", auto=False, shadow_share=0.0)
            cfg["shared_state"] = {"redis_url": redis.url}
            (tmp_path / "a").mkdir()
            (tmp_path / "b").mkdir()
            with running_gateway(cfg, tmp_path / "a", env=ENV) as a, \
                    running_gateway(cfg, tmp_path / "b", env=ENV) as b:
                assert rollout(a)["stage"] == rollout(b)["stage"] == "shadow"
                act(a, "advance")
                wait_for("b to see a's move", lambda: rollout(b)["stage"] == "canary")
                act(b, "promote")
                wait_for("a to see b's move", lambda: rollout(a)["stage"] == "full")
                assert rollout(a)["version"] == rollout(b)["version"]
                assert chat(sdk(a), "x")[1] == chat(sdk(b), "x")[1] == "candidate"
    finally:
        redis.stop()


def test_workers_without_shared_state_refuse_a_rollout(tmp_path: Path) -> None:
    cfg = remote_config("http://127.0.0.1:9/v1", "http://127.0.0.1:8/v1")
    with pytest.raises(RuntimeError, match="needs shared_state"), \
            running_gateway(cfg, tmp_path, env=ENV, args=("--workers", "2"), timeout=30):
        pass


def test_rollout_report_prints_the_comparison_with_the_admin_key_only(tmp_path: Path) -> None:
    with RolloutUpstream().running() as p, RolloutUpstream().running() as c:
        cfg = remote_config(p.url, c.url, stage="shadow", shadow_share=1.0, auto=False)
        with running_gateway(cfg, tmp_path, env=ENV) as url:
            chat(sdk(url), "u")
            wait_for("a pair", lambda: rollout(url)["report"]["pairs"] == 1)
            out = subprocess.run([sys.executable, "-m", "gateway.cli", "rollout", "report", "m",
                                  "--url", base(url)], capture_output=True, text=True,
                                 env={**os.environ, "GATEWAY_ADMIN_KEY": ADMIN},
                                 timeout=60)
            assert out.returncode == 0, out.stderr
            assert "shadow pairs compared" in out.stdout and "stage shadow" in out.stdout
            refused = subprocess.run([sys.executable, "-m", "gateway.cli", "rollout", "report",
                                      "m", "--url", base(url)], capture_output=True, text=True,
                                     env={**os.environ, "GATEWAY_ADMIN_KEY": "sk-demo-acme"},
                                     timeout=60)
            assert refused.returncode == 2 and "admin API key" in refused.stderr
