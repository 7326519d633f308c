"""items: names written before are stored composed (Unicode NFC), as the service now does

The service stores every name it is given composed since this revision ("Cafe\u0301"
becomes "Café"), and composes the `q` it searches with. A name stored decomposed before
would be found by neither spelling, and would not clash with its composed twin. This
migration composes every stored name. Two names that become equal, regardless of case,
stop the upgrade, listed, to be renamed first (as 0004 does). The downgrade keeps the names
as they are: composed names were valid before.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

"""
import unicodedata
from collections import defaultdict
from collections.abc import Sequence

from alembic import context, op
from sqlalchemy import text

from service.db.engine import fold_case_text

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if context.is_offline_mode():
        if op.get_context().dialect.name == "postgresql":
            op.execute("UPDATE items SET name = normalize(name, NFC) "
                       "WHERE name IS NOT NFC NORMALIZED")
        return  # SQLite: only Python composes (run the upgrade online)
    bind = op.get_bind()
    rows = bind.execute(text("SELECT id, name FROM items")).all()
    composed = {id_: unicodedata.normalize("NFC", name) for id_, name in rows}
    changed = [{"id": id_, "name": composed[id_]} for id_, name in rows if composed[id_] != name]
    if not changed:
        return
    groups: dict[str, list[str]] = defaultdict(list)
    for id_, name in rows:
        groups[fold_case_text(composed[id_])].append(name)
    clashes = [" | ".join(map(ascii, group)) for group in groups.values() if len(group) > 1]
    if clashes:
        raise RuntimeError(
            "These item names are equal once composed (Unicode NFC) and case is ignored, "
            "which the unique index on names refuses; rename all but one of each group "
            "and migrate again: " + "; ".join(clashes)
        )
    bind.execute(text("UPDATE items SET name = :name WHERE id = :id"), changed)


def downgrade() -> None:
    pass  # composed names are valid names before this revision too
