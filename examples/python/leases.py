"""pg_fence from Python with psycopg 3 (Debian 12: python3-psycopg).

A worker that acquires, renews and releases a lease; another session
waiting inside the server for the key; a fenced write refused (FN001)
because it carries the old token; an operation run exactly once
(fence.claim_operation in the transaction that does the work), a failed
attempt retried and a duplicate turned away. `make test` runs it straight against the
test cluster and again through PgBouncer in transaction mode, and compares
what it prints with leases.out (the README shows that).

    python3 examples/python/leases.py ["host=... port=... dbname=..."]
"""
import sys
import threading
import time
import uuid

import psycopg

CONNINFO = sys.argv[1] if len(sys.argv) > 1 else "host=127.0.0.1 port=28815 user=postgres dbname=pg_fence"
KEY = "py:invoice:42"


def connect():
    # autocommit: each call is its own transaction, as the lease functions
    # want. prepare_threshold=None: psycopg never prepares a statement on
    # the server, so the same code runs through a transaction pooler
    # (PgBouncer before 1.21 keeps no prepared statement across transactions).
    return psycopg.connect(CONNINFO, autocommit=True, prepare_threshold=None)


def one(connection, sql, params=()):
    return connection.execute(sql, params).fetchone()


def main():
    with connect() as worker, connect() as other:
        one(worker, "SELECT fence.lock_force_release(%s)", (KEY,))
        worker.execute("DROP TABLE IF EXISTS py_invoices")

        # 1. A worker takes the lease, renews it, and releases it.
        token, ttl = one(
            worker,
            "SELECT token, expires_at - acquired_at FROM fence.lock_acquire(%s, '2 seconds', 'py-worker')",
            (KEY,),
        )
        print(f"worker: granted {KEY} for {ttl}")
        (renewed,) = one(
            worker,
            "SELECT fence.lock_renew(%s, %s, '5 seconds') > clock_timestamp() + interval '4 seconds'",
            (KEY, token),
        )
        print(f"worker: renewed for 5 seconds: {renewed}")

        # 2. Another session waits inside the server for the key.
        waited = {}

        def wait_for_the_key():
            started = time.monotonic()
            (got,) = one(
                other,
                "SELECT token FROM fence.lock_acquire(%s, '10 seconds', 'py-waiter', wait => '10 seconds')",
                (KEY,),
            )
            waited["token"], waited["seconds"] = got, time.monotonic() - started

        waiter = threading.Thread(target=wait_for_the_key)
        waiter.start()
        time.sleep(0.5)
        (busy,) = one(worker, "SELECT fence.lock_acquire(%s, '1 second', 'py-third') IS NULL", (KEY,))
        print(f"a third session: busy: {busy}")
        (released,) = one(worker, "SELECT fence.lock_release(%s, %s)", (KEY, token))
        print(f"worker: released: {released}")
        waiter.join()
        print(
            "waiter: granted on the release, within a second of it: "
            f"{waited['seconds'] < 1.5}, with a newer token: {waited['token'] > token}"
        )

        # 3. Fenced writes: the table takes only the live lease's token.
        worker.execute("CREATE TABLE py_invoices (id int PRIMARY KEY, status text, fence_token bigint)")
        worker.execute("INSERT INTO py_invoices VALUES (42, 'open', 0)")
        worker.execute(
            "SELECT fence.protect('py_invoices', key_column => 'id', key_prefix => 'py:invoice:', token_column => 'fence_token')"
        )
        other.execute(
            "UPDATE py_invoices SET status = 'paid', fence_token = %s WHERE id = 42", (waited["token"],)
        )
        print("waiter: marked invoice 42 paid under its token")
        try:
            worker.execute(
                "UPDATE py_invoices SET status = 'refunded', fence_token = %s WHERE id = 42", (token,)
            )
            print("worker: the stale write went through (this is a bug)")
        except psycopg.Error as error:
            print(f"worker: its stale write was refused, SQLSTATE {error.sqlstate}")
        (status,) = one(worker, "SELECT status FROM py_invoices WHERE id = 42")
        print(f"invoice 42: {status}")
        one(other, "SELECT fence.lock_release(%s, %s)", (KEY, waited["token"]))
        worker.execute("DROP TABLE py_invoices")

        # 4. Run once: the claim commits (or vanishes) with the work. Each
        # attempt is one transaction, which a transaction pooler keeps on one
        # server connection.
        operation = f"py:capture:{uuid.uuid4()}"
        worker.execute("CREATE TABLE IF NOT EXISTS py_captures (operation text)")

        def attempt(connection, crash=False):
            try:
                with connection.transaction():
                    (ours,) = one(connection, "SELECT fence.claim_operation(%s)", (operation,))
                    if ours:
                        connection.execute("INSERT INTO py_captures VALUES (%s)", (operation,))
                        if crash:
                            raise RuntimeError("crashed before the commit")
                    return ours
            except RuntimeError:
                return "rolled back"

        print(f"run once: an attempt that crashes before its commit: {attempt(worker, crash=True)}")
        print(f"run once: the retry does the work: {attempt(worker)}")
        print(f"run once: a duplicate from another session does not: {attempt(other)}")
        (captures,) = one(worker, "SELECT count(*) FROM py_captures WHERE operation = %s", (operation,))
        print(f"run once: captures of the operation: {captures}")
        worker.execute("DROP TABLE py_captures")


if __name__ == "__main__":
    main()
