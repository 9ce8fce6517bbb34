"""Running the Redis backend's scripts (``redis_scripts.py``): one pipeline per call; and
pipelines sent now whose replies are read later, so the writer encodes its next group while
Redis runs this one: on one server through a writer connection (written, read later), on a
cluster through one sender thread (redis-py's cluster pipeline sends and reads at once).

Threads: :meth:`ScriptRunner.run` may be called from any thread (each pipeline takes a
connection of the client's pool); :meth:`ScriptRunner.send` / :meth:`ScriptRunner.receive`
belong to the index's one writer thread (the apply thread), which owns the writer
connection; sends run in order.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import redis
from redis.exceptions import NoScriptError

from edgellm.kvindex import redis_scripts
from edgellm.kvindex.redis_keys import Placement

__all__ = ["ScriptRunner"]

SCRIPTS = ("BATCH", "PARENTS", "MATCH", "DROP_CONTEXT", "IDLE", "TAKEOVER", "STATS")


class ScriptRunner:
    """Scripts ``(name, shard, args)`` -> replies (see the module docstring)."""

    def __init__(self, client: redis.Redis, placement: Placement) -> None:
        self._redis = client
        self._placement = placement
        self._sha: dict[str, str] = {}
        self._writer = None  # one server: the connection batches are written on
        self._sender: ThreadPoolExecutor | None = None  # a cluster: runs sent pipelines
        self.load()

    def load(self) -> None:
        """Load the scripts (again, after a restart or failover lost them); on a cluster,
        on every master."""
        self._sha = {name: self._redis.script_load(getattr(redis_scripts, name))
                     for name in SCRIPTS}

    def command(self, name: str, shard: str, args: list) -> tuple:
        # KEYS[1] routes it on a cluster (the shard's slot); G and S lead the arguments.
        return ("EVALSHA", self._sha[name], 1, f"{shard}:m", self._placement.scope(shard),
                shard, *args)

    def run(self, calls: list[tuple[str, str, list]]) -> list:
        """Run the scripts in one pipeline, in order, and return their replies. Scripts the
        server lost (a restart, a failover) are loaded again and the calls resent from the
        first refused for it (the ones after it were refused too). Raises the first error
        reply, or a connection error."""
        if len(calls) == 1:  # (a pipeline object costs ~20 us more than a plain command)
            name, shard, args = calls[0]
            try:
                return [self._redis.execute_command(*self.command(name, shard, args))]
            except NoScriptError:
                self.load()
                return [self._redis.execute_command(*self.command(name, shard, args))]
        pipe = self._redis.pipeline(transaction=False)
        for name, shard, args in calls:
            pipe.execute_command(*self.command(name, shard, args))
        replies = pipe.execute(raise_on_error=False)
        return self._checked(calls, replies)

    def send(self, calls: list[tuple[str, str, list]]) -> object:
        """Send the scripts as one pipeline without waiting for the replies (one server: on
        the writer connection; a cluster: by the sender thread). Returns what
        :meth:`receive` takes."""
        if self._placement.cluster:
            if self._sender is None:
                self._sender = ThreadPoolExecutor(1, thread_name_prefix="kvindex-send")
            return self._sender.submit(self.run, calls)
        if self._writer is None:
            self._writer = self._redis.connection_pool.get_connection()
        conn = self._writer
        try:
            conn.send_packed_command(conn.pack_commands(
                [self.command(name, shard, args) for name, shard, args in calls]))
        except Exception:
            self._drop_writer()
            raise
        return (conn, calls)

    def receive(self, sent: object) -> list:
        """The replies of a :meth:`send`, as :meth:`run` returns them."""
        if isinstance(sent, list):
            return sent
        if isinstance(sent, Future):
            return sent.result()
        conn, calls = sent
        replies: list = []
        try:
            for _ in calls:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as exc:
                    replies.append(exc)
        except Exception:
            self._drop_writer()
            raise
        return self._checked(calls, replies)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.shutdown(wait=True)
            self._sender = None
        if self._writer is not None:
            self._redis.connection_pool.release(self._writer)
            self._writer = None

    def _checked(self, calls: list, replies: list) -> list:
        first = next((i for i, r in enumerate(replies) if isinstance(r, NoScriptError)), None)
        if first is not None:
            self.load()
            replies[first:] = self.run(calls[first:])
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _drop_writer(self) -> None:
        if self._writer is not None:
            self._writer.disconnect()
            self._redis.connection_pool.release(self._writer)
            self._writer = None
