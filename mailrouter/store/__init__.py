"""Store: everything the router remembers, and the only package that talks SQL.

`db` opens the database (engine, pragmas, transactions, migrations), `tables` is the
schema, `repo` holds every statement of the mail path, `outbox` the outbox's states.
"""
