"""Security settings that must not regress."""

import ast

from realfake.config import Settings
from tests.conftest import REPO
from worker.celery import make_app

SOURCES = [p for d in ("realfake", "worker", "scheduler", "bench") for p in (REPO / d).rglob("*.py")]


def test_celery_speaks_json_only(tmp_path):
    conf = make_app(Settings.from_env({"REALFAKE_HOME": str(tmp_path)})).conf
    assert conf.accept_content == ["json"]
    assert conf.task_serializer == conf.result_serializer == conf.event_serializer == "json"


def test_every_torch_load_is_weights_only():
    calls = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                calls.append((path.name, keywords.get("weights_only")))
    assert calls and all(value == "True" for _, value in calls), calls


def test_no_sql_is_built_from_strings_in_the_product():
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in {"text", "sqlalchemy.text"}:
                assert isinstance(node.args[0], ast.Constant), f"{path}: text() with a built string"


def test_what_workers_publish_holds_no_password(tmp_path):
    """`celery inspect conf` and Flower's worker pages publish the app's conf, as its control
    command encodes it."""
    from celery.utils.serialization import jsonify
    from kombu.utils.encoding import safe_repr
    from kombu.utils.json import dumps

    settings = Settings.from_env({"REALFAKE_HOME": str(tmp_path),
                                  "REALFAKE_DATABASE_URL": "postgresql+psycopg://u:topsecret@db/x",
                                  "REALFAKE_BROKER_URL": "redis://:brokersecret@127.0.0.1:6379/0"})
    app = make_app(settings)
    published = dumps(jsonify(app.conf.table(with_defaults=True), unknown_type_filter=safe_repr))
    assert "topsecret" not in published and "brokersecret" not in published
    assert app.realfake_settings is settings and "realfake_settings" not in app.conf  # the tasks' settings, off the conf
    assert "topsecret" not in repr(settings) and "brokersecret" not in repr(settings) and "u:***@db" in repr(settings)
    odd = Settings.from_env({"REALFAKE_HOME": str(tmp_path), "REALFAKE_DATABASE_URL": "topsecret@nowhere",
                             "REALFAKE_BROKER_URL": "redis://:p@ss@127.0.0.1:6379/0"})
    assert "topsecret" not in repr(odd) and "p@ss" not in repr(odd) and "ss@127" not in repr(odd)  # hidden, whatever the URLs


def test_settings_mask_credentials_when_printed():
    from sqlalchemy.engine import make_url

    url = Settings.from_env({"REALFAKE_DATABASE_URL": "postgresql+psycopg://u:topsecret@db/x"}).database_url
    assert "topsecret" not in make_url(url).render_as_string(hide_password=True)
    assert not any("hide_password=False" in p.read_text() for p in SOURCES if p.parent.name != "tests")
