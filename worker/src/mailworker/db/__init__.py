"""PostgreSQL storage: typed SQLAlchemy 2.x models, a lazily created engine, Alembic migrations."""
