"""Leader election for the kube-controller-manager stand-in, on a coordination.k8s.io Lease.

Python 3.11 standard library only. It follows client-go's leaderelection with the Lease lock,
polled every retry period since the stand-in apiserver has no watch:

- a candidate creates the Lease, or takes it over when its holder is empty or the record has
  not changed for leaseDurationSeconds (as observed locally, so clocks need not agree), with an
  update conditioned on the resourceVersion, so one candidate wins;
- the leader renews it every retry period and stops leading when no renewal has succeeded for
  the renew deadline;
- on SIGTERM the leader releases it (empty holder, leaseDurationSeconds 1), so a successor
  takes over within a retry period.

The real kube-controller-manager exits when it loses the lease (and is restarted); the stand-in
stops its controllers and becomes a candidate again.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime

from component_common import ApiClient, ApiFailure
from controllers_common import LOG, Kind, Obj

LEASES = Kind("Lease", "coordination.k8s.io/v1", "leases")


def micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, client: ApiClient, namespace: str, name: str, identity: str,
                 lease_duration: float, renew_deadline: float, retry_period: float) -> None:
        self.client, self.namespace, self.name, self.identity = client, namespace, name, identity
        self.lease_duration, self.renew_deadline = lease_duration, renew_deadline
        self.retry_period = retry_period
        self._lock = threading.Lock()
        self._leader, self._renewed = False, 0.0
        self._observed = ("", 0.0)  # (the Lease spec as JSON, when it was first seen so)
        self._last_error, self._last_holder = "", ""
        self.thread: threading.Thread | None = None

    @property
    def lease(self) -> str:
        return f"{self.namespace}/{self.name}"

    def is_leader(self) -> bool:
        with self._lock:
            return self._leader and time.monotonic() - self._renewed < self.renew_deadline

    def start(self, stop: threading.Event) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self.run, args=(stop,), name="leader",
                                           daemon=True)
            self.thread.start()

    def run(self, stop: threading.Event) -> None:
        LOG.info(f"attempting to acquire leader lease {self.lease}...")
        while not stop.is_set():
            self.try_once()
            stop.wait(self.retry_period)

    def try_once(self) -> None:
        was = self.is_leader()
        try:
            ok = self._acquire_or_renew()
            self._last_error = ""
        except ApiFailure as exc:
            ok = False
            if str(exc) != self._last_error:
                self._last_error = str(exc)
                LOG.error(f"error retrieving resource lock {self.lease}: {exc}")
        now = time.monotonic()
        with self._lock:
            if ok:
                self._leader, self._renewed = True, now
            elif self._leader and now - self._renewed >= self.renew_deadline:
                self._leader = False
                LOG.error(f'"failed to renew lease {self.lease}: timed out waiting for the '
                          f'condition"')
                LOG.error('"leaderelection lost" (the stand-in stops its controllers and '
                          "becomes a candidate again)")
        if ok and not was:
            LOG.info(f"successfully acquired lease {self.lease}")

    def _get(self) -> Obj | None:
        try:
            got = self.client.call("GET", LEASES.path(self.namespace, self.name))
        except ApiFailure as exc:
            if exc.code == 404:
                return None
            raise
        return got if isinstance(got, dict) else None

    def _acquire_or_renew(self) -> bool:
        lease, stamp = self._get(), micro_time()
        if lease is None:
            body: Obj = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": {"holderIdentity": self.identity,
                             "leaseDurationSeconds": max(1, round(self.lease_duration)),
                             "acquireTime": stamp, "renewTime": stamp, "leaseTransitions": 0}}
            try:
                got = self.client.call("POST", LEASES.path(self.namespace), body)
            except ApiFailure as exc:
                if exc.code == 409:
                    return False
                raise
            self._observe(dict((got or {}).get("spec") or body["spec"]))
            return True
        spec = dict(lease.get("spec") or {})
        self._observe(spec)
        holder = str(spec.get("holderIdentity") or "")
        if holder and holder != self.identity:
            duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
            if time.monotonic() - self._observed[1] < duration:
                if holder != self._last_holder:
                    self._last_holder = holder
                    LOG.info(f'"lock is held by {holder} and has not yet expired" '
                             f'lease="{self.lease}"')
                return False
        new = {**spec, "holderIdentity": self.identity,
               "leaseDurationSeconds": max(1, round(self.lease_duration)), "renewTime": stamp}
        if holder != self.identity:
            new["acquireTime"] = stamp
            new["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        lease["spec"] = new
        try:
            got = self.client.call("PUT", LEASES.path(self.namespace, self.name), lease)
        except ApiFailure as exc:
            if exc.code == 409:
                return False
            raise
        self._observe((got or lease).get("spec") or {})
        self._last_holder = self.identity
        return True

    def _observe(self, spec: Obj) -> None:
        record = json.dumps(spec, sort_keys=True)
        if record != self._observed[0]:
            self._observed = (record, time.monotonic())

    def release(self) -> None:
        """Give the Lease up (if ours), so a successor need not wait for it to expire."""
        if self.thread is not None:
            self.thread.join(timeout=10)
        if not self.is_leader():
            return
        with self._lock:
            self._leader = False
        try:
            lease = self._get()
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != \
                    self.identity:
                return
            stamp = micro_time()
            lease["spec"] = {**lease["spec"], "holderIdentity": "", "leaseDurationSeconds": 1,
                             "acquireTime": stamp, "renewTime": stamp}
            self.client.call("PUT", LEASES.path(self.namespace, self.name), lease)
        except ApiFailure as exc:
            LOG.error(f"failed to release lease {self.lease}: {exc}")
            return
        LOG.info(f"released lease {self.lease}")
