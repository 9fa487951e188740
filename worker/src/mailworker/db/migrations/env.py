"""Alembic environment: online migrations only, on the engine migrate.py hands over."""

from alembic import context
from mailworker.db.models import Base

engine = context.config.attributes["engine"]

with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()
