"""Test-wide settings: nothing downloads, caches and state live in temporary directories."""
import os
import tempfile

# Set before any test imports transformers/huggingface_hub, so no test can reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("SKYPILOT_DISABLE_LOCAL_API_SERVER", "1")
# One tiny-model cache per test session: built once, shared by every test that trains.
os.environ.setdefault("SPOTUNE_CACHE", tempfile.mkdtemp(prefix="spotune-cache-"))


# ---- ledger ---------------------------------------------------------------------------------
import uuid  # noqa: E402

import pytest  # noqa: E402


def _postgres_database(server_url: str):
    """A fresh database on the test server for one test; dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from orchestrator.ledger import normalize_url

    server = make_url(normalize_url(server_url))
    name = f"spotune_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger_url(request, tmp_path):
    """A ledger database URL: a SQLite file, and a fresh PostgreSQL database when
    SPOTUNE_TEST_PG_URL names a server (e.g. postgresql+psycopg://postgres@127.0.0.1:55432/postgres)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    server_url = os.environ.get("SPOTUNE_TEST_PG_URL")
    if not server_url:
        pytest.skip("PostgreSQL ledger tests need SPOTUNE_TEST_PG_URL (a server URL)")
    yield from _postgres_database(server_url)
