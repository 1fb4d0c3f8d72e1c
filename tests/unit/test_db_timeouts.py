"""A PostgreSQL connection cannot hang its caller: opening it and each statement time out."""

from __future__ import annotations

from app.core.settings import Settings
from app.store.db import server_connect_args

PG = "postgresql+psycopg://gpuq@db.example:5432/gpuq"


def test_a_postgresql_url_gets_a_connect_and_a_statement_timeout():
    settings = Settings(db_connect_timeout_s=7, db_statement_timeout_s=12.5, _env_file=None)
    assert server_connect_args(settings, PG) == {
        "connect_timeout": 7, "options": "-c statement_timeout=12500"}


def test_the_defaults_are_10_s_to_connect_and_30_s_a_statement():
    assert server_connect_args(Settings(_env_file=None), PG) == {
        "connect_timeout": 10, "options": "-c statement_timeout=30000"}


def test_what_the_url_says_itself_wins_and_its_options_are_kept():
    url = f"{PG}?connect_timeout=3&options=-c%20search_path%3Dgpuq"
    assert server_connect_args(Settings(_env_file=None), url) == {
        "options": "-c search_path=gpuq -c statement_timeout=30000"}


def test_migrations_and_a_zero_setting_have_no_statement_timeout():
    assert server_connect_args(Settings(_env_file=None), PG, limit_statements=False) == {
        "connect_timeout": 10}
    assert server_connect_args(Settings(db_statement_timeout_s=0, _env_file=None), PG) == {
        "connect_timeout": 10}


def test_sqlite_gets_none_of_them():
    settings = Settings(_env_file=None)
    assert server_connect_args(settings, settings.sqlite_url) == {}
