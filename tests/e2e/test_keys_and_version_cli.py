"""What an operator meets on day one, run as the real CLI (t200): ``--version``, ``keys list``,
``keys new`` for any valid tenant and with ``--engine-fields``."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config.loader import load_keys
from gateway.protocols.engine_fields import ENGINE_FIELDS

INLINE_HASH = "sha256:" + "c" * 64

POLICY = f"""\
pair: {{small: s, large: l}}
models:
  s: {{base_url: "http://127.0.0.1:9/v1", price: {{input: 0, output: 0}}, tier: small}}
  l: {{base_url: "http://127.0.0.1:9/v1", price: {{input: 0, output: 0}}, tier: large}}
routes:
  fast: {{model: s}}
auth:
  mode: keys
  key_file: keys.yaml
  keys: [{{id: ops, tenant: platform, hash: "{INLINE_HASH}", admin: true}}]
"""


_ROOT = Path(__file__).resolve().parents[2]


def _gateway(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m gateway`` run from ``cwd``, this checkout's package first (as a deployment's venv has it)."""
    path = os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60, cwd=cwd,
        env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A deployment's folder, the commands run from it with their defaults (./policies.yaml, ./.gateway)."""
    (tmp_path / "policies.yaml").write_text(POLICY)
    return tmp_path


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_the_version_is_printed(flag: str, tmp_path: Path) -> None:
    done = _gateway(flag, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"llm-gateway {importlib.metadata.version('llm-gateway')}\n"


def test_a_key_for_a_tenant_with_a_space_gets_an_id_made_from_it(folder: Path) -> None:
    """t200: "a b" is a valid tenant, and the id made from it was not a valid id (give one with --id)."""
    for tenant in ("a b", "Acme Corp / EU", "café", "日本"):
        made = _gateway("keys", "new", "--tenant", tenant, cwd=folder)
        assert made.returncode == 0, made.stderr
        key_id = re.search(r"^key id:  (\S+)$", made.stdout, re.MULTILINE)
        assert key_id is not None, made.stdout
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", key_id[1])
        [key] = [key for key in load_keys(folder / "policies.yaml").keys if key.id == key_id[1]]
        assert key.tenant == tenant
    ids = [key.id for key in load_keys(folder / "policies.yaml").keys]
    assert ids[1].startswith("a-b-") and ids[2].startswith("Acme-Corp-EU-") and ids[3].startswith("cafe-")


def test_keys_new_takes_engine_fields_and_refuses_what_is_no_engine_field(folder: Path) -> None:
    """t200: the key file's `engine_fields` (f223) had no option in `keys new`."""
    made = _gateway("keys", "new", "--tenant", "batch", "--id", "nightly", "--engine-fields", "priority, vllm_xargs",
                    cwd=folder)  # fmt: skip
    assert made.returncode == 0, made.stderr
    [key] = [key for key in load_keys(folder / "policies.yaml").keys if key.id == "nightly"]
    assert key.engine_fields == ["priority", "vllm_xargs"]

    refused = _gateway("keys", "new", "--tenant", "batch", "--engine-fields", "priority,temperature", cwd=folder)
    assert refused.returncode == 2 and "secret" not in refused.stdout
    assert "argument --engine-fields: 'temperature' is no engine field; it takes `bootstrap_host`, " in refused.stderr
    refused = _gateway("keys", "new", "--tenant", "batch", "--engine-fields", " , ", cwd=folder)
    assert refused.returncode == 2 and "secret" not in refused.stdout
    assert "argument --engine-fields: ' , ' names no engine field (leave it out for none)" in refused.stderr
    assert [key.id for key in load_keys(folder / "policies.yaml").keys] == ["ops", "nightly"]


def test_keys_list_shows_every_key_where_it_is_written_and_no_secret(folder: Path) -> None:
    """t200: which keys exist was to be read in keys.yaml (and policies.yaml's auth.keys) by hand."""
    made = _gateway("keys", "new", "--tenant", "team a", "--id", "app", "--models", "fast", "--rpm", "60",
                    "--usd-per-day", "2.5", "--engine-fields", "priority", cwd=folder)  # fmt: skip
    assert made.returncode == 0, made.stderr
    secret = re.search(r"^secret:  (\S+)$", made.stdout, re.MULTILINE)
    assert secret is not None
    written = (folder / "keys.yaml").read_text()
    full_hash = re.search(r"sha256:[0-9a-f]{64}", written)
    assert full_hash is not None

    listed = _gateway("keys", "list", cwd=folder)
    assert listed.returncode == 0, listed.stderr
    for shown in (listed.stdout, listed.stderr):
        assert secret[1] not in shown and full_hash[0] not in shown and INLINE_HASH not in shown
    rows = listed.stdout.splitlines()
    assert rows[0].split() == ["ID", "TENANT", "MODELS", "LIMITS", "ENGINE_FIELDS", "ADMIN", "HASH", "WRITTEN_IN"]
    assert len(rows) == 3
    assert rows[1].split() == ["ops", "platform", "*", "-", "-", "yes", "sha256:cccccccc", "policies.yaml:auth.keys"]
    assert rows[2].split()[0] == "app" and "team a" in rows[2]
    assert rows[2].split()[-3:] == ["no", f"{full_hash[0][:15]}", "keys.yaml"]
    assert "rpm=60,usd_per_day=2.5" in rows[2] and " priority " in rows[2]

    as_json = _gateway("keys", "list", "--json", "--policies", str(folder / "policies.yaml"), cwd=folder.parent)
    assert as_json.returncode == 0, as_json.stderr
    assert secret[1] not in as_json.stdout and full_hash[0] not in as_json.stdout
    listing = json.loads(as_json.stdout)
    assert listing["auth_mode"] == "keys" and listing["key_file"] == str(folder / "keys.yaml")
    assert listing["keys"] == [
        {"id": "ops", "tenant": "platform", "models": ["*"], "limits": {}, "engine_fields": [], "admin": True,
         "hash_prefix": "sha256:cccccccc", "source": "auth.keys", "file": str(folder / "policies.yaml")},
        {"id": "app", "tenant": "team a", "models": ["fast"], "limits": {"rpm": 60, "usd_per_day": 2.5},
         "engine_fields": ["priority"], "admin": False, "hash_prefix": full_hash[0][:15], "source": "key_file",
         "file": str(folder / "keys.yaml")},
    ]  # fmt: skip
    assert set(listing["keys"][1]["engine_fields"]) <= ENGINE_FIELDS
