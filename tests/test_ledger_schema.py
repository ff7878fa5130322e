"""The SQLAlchemy models declare the schema the Alembic migrations create.

The migrations are what build a ledger; the models only describe it. If the two drift apart, an
`alembic revision --autogenerate` proposes spurious changes and the models misstate the schema
(which indexes exist, on which columns, in which order, with which server defaults). Here a real,
empty PostgreSQL database is upgraded to head and Alembic's own comparison must find nothing to change.
"""

import pprint

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import CheckConstraint, create_engine, inspect, pool

from offbeat.ledger import upgrade
from offbeat.ledger.migrate import sync_url
from offbeat.ledger.models import Base

pytestmark = pytest.mark.integration


def test_models_match_migrated_schema(fresh_database_url):
    upgrade(fresh_database_url)
    engine = create_engine(sync_url(fresh_database_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_server_default": True})
            diff = compare_metadata(context, Base.metadata)
            # Alembic does not compare check constraints; their names at least must agree.
            db_checks = {
                t: {c["name"] for c in inspect(conn).get_check_constraints(t)} for t in Base.metadata.tables
            }
    finally:
        engine.dispose()
    assert diff == [], "models differ from the migrated schema:\n" + pprint.pformat(diff, width=110)
    model_checks = {
        name: {c.name for c in table.constraints if isinstance(c, CheckConstraint)}
        for name, table in Base.metadata.tables.items()
    }
    assert model_checks == db_checks
