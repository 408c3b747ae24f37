"""Alembic environment: runs against the connection `node.db.migrate` passes in,
or against `sqlalchemy.url` when invoked through the alembic CLI."""

from alembic import context
from sqlalchemy import engine_from_config, pool, text

from node.db import Base

config = context.config
target_metadata = Base.metadata


def _wide_version_table(connection) -> None:
    """Alembic's own version table holds 32 characters; revision ids that name their issue
    (``0002_issue14_worker_settings_digest``) are longer, so the table is made 64 wide first."""
    if connection.dialect.name != "postgresql":
        return  # SQLite does not enforce VARCHAR lengths
    connection.execute(text(
        "CREATE TABLE IF NOT EXISTS alembic_version "
        "(version_num VARCHAR(64) NOT NULL, CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
    ))
    connection.execute(text("ALTER TABLE alembic_version ALTER COLUMN version_num TYPE VARCHAR(64)"))


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _wide_version_table(connection)
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as conn:
        _wide_version_table(conn)
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
