"""The scheduler: which rollout requests go out, and when.

- Training groups: one `rollout.request` per prompt with `n = [run] group_size` samples; the
  trajectory ids are assigned here (`<group>-<i>`), msg id `request:{request_id}:{attempt}:{token}`
  (`token`: this scheduler's, so a restarted one, whose restored groups count attempts from 0
  again, is never taken by the server's dedup for a re-issue its predecessor already sent).
- Staleness budget: with the trainer at step t, the training groups dispatched but not yet
  finished (every trajectory trained, dropped, failed or discarded) stay <= G * (max_staleness + 1),
  G = `groups_per_step`. A group dispatched now is consumed at most `max_staleness` steps later,
  but only if inference already serves the trainer's newest weights; while the live version lags
  the newest published one by `lag` steps, the budget shrinks to G * (max_staleness + 1 - lag)
  (for at most `live_wait_timeout_s` after that version appeared). So `max_staleness = 0`
  dispatches exactly one step's worth, waits for the step report and for the new version to be
  live: synchronous RL.
- A group the trainer will certainly drop (`groups.never_trained`) stops counting against the
  budget, so it cannot starve the trainer of the batch whose step report would release it; but
  only up to one budget's worth (G * (max_staleness + 1)) of such groups at once: if every new
  group is doomed too (inference stuck serving an old version), dispatch stops there instead of
  generating groups nobody will train as fast as inference can.
- Stall guard: when nothing moved for `stall_timeout_s` (or 3x the longest step interval seen),
  every training group in flight is fully generated and no step came, the trainer is holding
  or has silently dropped them (e.g. groups with nothing trainable, reported only with the next
  step): one more step's worth is dispatched, at most G beyond the bound, so the run cannot
  deadlock. The trainer's staleness filter still applies to whatever is trained.
- No more groups than the remaining `max_steps` need; nothing new once the trainer reports it.
- Re-issue: a request whose completions have not all arrived after `request_timeout_s` is sent
  again with the same ids and `attempt + 1`; after `max_attempts` its missing samples are `failed`.
- Lost samples: a training sample failed before it reached the trainer (no completion after the
  last attempt, or dead-lettered on the way) is announced on `rollout.scored` with status `LOST`
  (msg id `lost:{trajectory_id}`), and the trainer trains the rest of its group without it instead
  of holding them for good. A restarted scheduler announces the failed samples of the groups it
  takes over again (repeats are no-ops).
- Difficulty filter (optional): a prompt whose group came back all right or all wrong is skipped
  from then on (by env and prompt key).
- Pause: the KV flag at start, control subjects and the admin API stop dispatch (time-outs too);
  resume restarts both.
- Restart: `restore` takes over the groups a previous orchestrator left in flight (from the
  ledger), finding their prompts again by key, so they count against the budget and are re-issued;
  `continue_run` (at the start of `run`) takes the rolled-back versions from the ledger, numbers
  requests after every one the run used, and draws the prompt mixture past the prompts it sent.
- Rollback: the trainer finishes the step it is on before it acts on a rollback, so reports of the
  undone timeline can follow it. Until the target version is re-announced (`fence`), a step report
  only retires its trajectories and other versions are rolled back; after that, events naming a
  rolled-back version (or a child of one) are ignored.
- Sampling seeds: request number s of a run with seed r gets `request_seed(r, s)`, and inference
  gives sample i the seed + i; requests are `SEED_SPACING` apart, so no two samples of a run share
  a seed (with consecutive seeds, group s's sample i and group s+1's sample i-1 drew the same
  numbers). A run with the same seed sends the same prompts with the same seeds; a re-issued or
  restored request keeps its seed, and a restarted scheduler goes on with new request numbers.
- Eval: at step 0, every `eval_every` steps and at `max_steps`, once the trainer's newest version
  is live (so it measures that version): the first `eval_examples` prompts of each environment's
  eval split, `eval = true`, `eval_temperature` (greedy by default).

The scheduler learns what happened from the ledger writer (`observe`, called after each commit).
Not covered: recording anything (the ledger writer) or the trainer's own staleness filter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

from offbeat.bus import Bus, Publication
from offbeat.config import RunSection
from offbeat.ledger.models import TERMINAL
from offbeat.ledger.store import Ledger, RollbackResult
from offbeat.v1 import policy_pb2, rollout_pb2
from offbeat_orchestrator.config import OrchestratorConfig
from offbeat_orchestrator.events import Rows, dead_letter_trajectories, reward_status_name
from offbeat_orchestrator.groups import Group, never_trained
from offbeat_orchestrator.ledger_writer import LedgerWriter, Observed
from offbeat_orchestrator.prompts import MAX_SKIPS, ExampleSource, Mixture, eval_prompts, set_prompt

log = logging.getLogger("offbeat.orchestrator.scheduler")
SEED_SPACING: Final = 2**16
"""Seeds between consecutive requests: room for groups of up to 65,536 samples."""


def request_seed(run_seed: int, seq: int) -> int:
    """The sampling seed of the run's `seq`-th request (sample i uses it + i). Runs with different
    seeds start 2**40 apart (2**24 requests each before they could meet); fits an int64."""
    return (run_seed % 2**22) * 2**40 + seq * SEED_SPACING


def _seq_of(group_id: str) -> int:
    """The request number in a group id `<token>-<seq>` (0 when it has none)."""
    tail = group_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class Scheduler:
    """Dispatches rollout requests within the staleness budget; see the module docstring."""

    def __init__(
        self,
        bus: Bus,
        run: RunSection,
        cfg: OrchestratorConfig,
        envs: Sequence[tuple[str, float, ExampleSource]],
        *,
        writer: LedgerWriter | None = None,
        start_step: int = 0,
        zero_advantage_dropped: bool = False,
    ) -> None:
        self.bus = bus
        self.shape = run
        self.cfg = cfg
        self.envs = list(envs)
        self.writer = writer
        self.mixture = Mixture(self.envs, seed=run.seed)
        self.token = uuid.uuid4().hex[:8]
        self.seq = 0
        self.step = start_step
        self.paused = False
        self.stopped = False
        self.groups: dict[str, Group] = {}
        self.by_trajectory: dict[str, str] = {}
        self.skip: set[tuple[str, str]] = set()
        self.zero_advantage_dropped = zero_advantage_dropped
        """The trainer drops groups whose advantages are all zero (`[trainer] filter_zero_advantage`)."""
        self.rolled_back_versions: set[int] = set()
        self.fence: int | None = None
        """After a rollback, the target version until its re-announcement comes: what the trainer
        reports before that is from the timeline the rollback undid."""
        self._fenced_at = 0.0
        self.version_steps: dict[int, int] = {}
        self.live_version: int | None = None
        self.live_step = 0
        self.evaluated_steps: set[int] = set()
        self.dispatched_groups = 0
        self.reissued = 0
        self.ticks = 0
        self.newest_step = 0
        """Trainer step of the newest version known to exist (announced or named in a step report)."""
        self._newest_at: float | None = None
        self._eval_cache: list[Any] | None = None
        self._wake = asyncio.Event()
        self._unsent: list[rollout_pb2.RolloutRequest] = []
        self._lost: list[rollout_pb2.ScoredTrajectory] = []
        """LOST notices not yet published."""
        self.stall_topups = 0
        """Times the pipeline stalled and one step's worth of groups beyond the bound went out."""
        self._last_progress = time.time()
        self._last_step_at: float | None = None
        self._longest_step_s = 0.0
        if writer is not None:
            writer.observers.append(self.observe)

    # --- state ---------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.step >= self.shape.max_steps

    def train_groups_in_flight(self) -> int:
        """Training groups that still count against the budget: all but those the trainer will
        drop whole (counting them could leave it without a batch, and so without the step report
        that would release them), of which at most one budget's worth is left out."""
        train = [g for g in self.groups.values() if not g.eval]
        doomed = sum(1 for g in train if self._doomed(g))
        allowance = self.shape.groups_per_step * (self.shape.max_staleness + 1)
        return len(train) - doomed + max(0, doomed - allowance)

    def _doomed(self, group: Group) -> bool:
        return never_trained(
            group,
            step=self.step,
            max_staleness=self.shape.max_staleness,
            rolled_back_versions=self.rolled_back_versions,
            zero_advantage_dropped=self.zero_advantage_dropped,
        )

    def trajectories_in_flight(self) -> int:
        return sum(len(g.open) for g in self.groups.values())

    def lag(self, now: float | None = None) -> int:
        """Steps by which the version inference serves lags the newest version that exists (up to
        the trainer's step). Waiting is pointless for weights not yet published, so only those
        count, and only for `live_wait_timeout_s` after they appeared (a missing PolicyLive slows
        the run, never stalls it)."""
        now = time.time() if now is None else now
        lag = max(0, min(self.step, self.newest_step) - self.live_step)
        if lag and self._newest_at is not None and now - self._newest_at >= self.cfg.live_wait_timeout_s:
            return 0
        return lag

    def _known(self, version: int, step: int) -> None:
        self.version_steps.setdefault(version, step)
        if step > self.newest_step:
            self.newest_step, self._newest_at = step, time.time()

    def budget(self, now: float | None = None) -> int:
        """Training groups that may be dispatched now."""
        now = time.time() if now is None else now
        g, k = self.shape.groups_per_step, self.shape.max_staleness
        cap = g * max(0, k + 1 - self.lag(now))
        cap = min(cap, g * max(0, self.shape.max_steps - self.step))
        in_flight = self.train_groups_in_flight()
        if cap - in_flight <= 0 and self._stalled(now, in_flight):
            self.stall_topups += 1
            self._last_progress = now
            log.warning(
                "no progress for %.0fs with %d fully generated groups in flight and no trainer step: "
                "the trainer may be dropping groups it has not reported yet; dispatching %d more",
                self.stall_threshold_s(),
                in_flight,
                g,
            )
            return g
        return max(0, cap - in_flight)

    def stall_threshold_s(self) -> float:
        return max(self.cfg.stall_timeout_s, 3 * self._longest_step_s)

    def _stalled(self, now: float, in_flight: int) -> bool:
        """Nothing moved for the stall threshold, inference owes nothing, and at most one step's
        worth of groups beyond the bound is out: then one more step's worth may go."""
        g, k = self.shape.groups_per_step, self.shape.max_staleness
        if self.finished or in_flight >= g * (k + 2) or now - self._last_progress < self.stall_threshold_s():
            return False
        return all(not group.pending for group in self.groups.values() if not group.eval)

    def eval_due(self, now: float | None = None) -> bool:
        """At step 0, every `eval_every` steps and at `max_steps`, once each, once the trainer's
        newest weights are live (so the eval measures the version of that step)."""
        every = self.cfg.eval_every
        at = bool(every) and (self.step % every == 0 or self.step >= self.shape.max_steps)
        return at and self.step not in self.evaluated_steps and self.lag(now) == 0

    def wake(self) -> None:
        self._wake.set()

    def restore(self, rows: Sequence[dict[str, Any]], *, now: float | None = None) -> int:
        """Take over the groups a previous orchestrator left in flight (`Ledger.unfinished_groups`),
        so a restart neither exceeds the budget nor forgets to re-issue. Returns groups restored."""
        now = time.time() if now is None else now
        sources = {name: source for name, _, source in self.envs}
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault(row["group_id"], []).append(row)
        for gid, members in groups.items():
            first = members[0]
            ids = [m["trajectory_id"] for m in members]
            request = rollout_pb2.RolloutRequest(
                run_id=self.bus.run_id,
                request_id=first["request_id"] or gid,
                group_id=gid,
                env=first["env"] or "",
                prompt_key=first["prompt_key"] or "",
                n=len(ids),
                sampling=self._sampling(
                    eval_=bool(first["eval"]), seed=request_seed(self.shape.seed, _seq_of(gid))
                ),
                trajectory_ids=ids,
                eval=bool(first["eval"]),
                created_at=first["requested_at"].timestamp() if first["requested_at"] else now,
            )
            source = sources.get(request.env)
            reissuable = False
            with contextlib.suppress(KeyError, AttributeError, ValueError):
                set_prompt(request, source.get(request.prompt_key).prompt)  # type: ignore[union-attr]
                reissuable = True
            terminal = {m["trajectory_id"] for m in members if m["status"] in TERMINAL}
            group = Group(
                request=request,
                dispatched_at=now,
                pending={m["trajectory_id"] for m in members if m["status"] == "requested"},
                open=set(ids) - terminal,
                reissuable=reissuable,
            )
            self.groups[gid] = group
            self.seq = max(self.seq, _seq_of(gid))
            self.by_trajectory.update((tid, gid) for tid in set(ids) - terminal)
            if not group.eval:  # the previous scheduler may have died before it said so
                for m in members:
                    if m["status"] == "failed":
                        self._lose(group, m["trajectory_id"], m["reason"] or "failed")
        if groups:
            log.info("restored %d groups in flight from the ledger", len(groups))
        return len(groups)

    async def continue_run(self, ledger: Ledger) -> None:
        """Go on from what the run's earlier schedulers did (nothing on a fresh run): the versions
        rolled back, request numbers after every one they used (a number used twice would give two
        samples of the run one seed), and the prompt mixture past the prompts they drew."""
        run_id = self.bus.run_id
        self.rolled_back_versions |= {
            int(p["version"]) for p in await ledger.list_policies(run_id) if p["status"] == "rolled_back"
        }
        sent = sorted(
            (_seq_of(gid), gid, env, key, ev) for gid, env, key, ev in await ledger.sent_groups(run_id)
        )
        if not sent:
            return
        self.seq = max(self.seq, sent[-1][0]) + self._published_ahead()
        self._advance_mixture([(env, key) for _, _, env, key, ev in sent if not ev])
        log.info("continuing after %d earlier requests from request number %d", len(sent), self.seq + 1)

    def _published_ahead(self) -> int:
        """Requests a scheduler can have sent that the ledger had not recorded when it stopped (a
        request is finished only once recorded): the budget, a stall top-up and one eval round."""
        g, k = self.shape.groups_per_step, self.shape.max_staleness
        return g * (k + 2) + self.cfg.eval_examples * len(self.envs)

    def _advance_mixture(self, drawn: Sequence[tuple[str, str]]) -> None:
        """Draw again the prompts `drawn` ((env, prompt key) of the run's training groups, in the
        order sent), passing over those the difficulty filter skipped, so a restart goes on with the
        prompts after them. If the sequence is not the mixture's (a run restarted before schedulers
        went on, other environments or seed), one draw per group instead."""
        if not self.mixture:
            return
        for env, key in drawn:
            for _ in range(MAX_SKIPS):
                name, example = self.mixture.draw()
                if (name, example.key) == (env, key):
                    break
            else:
                log.warning("the run's prompts do not follow its mixture; skipping one prompt per group")
                self.mixture = Mixture(self.envs, seed=self.shape.seed)
                for _ in drawn:
                    self.mixture.draw()
                return

    # --- what happened (called by the ledger writer after each commit) ---------------------------

    def observe(self, events: list[Observed]) -> None:
        for e in events:
            try:
                self._observe(e)
            except Exception:  # one odd event must not hide the rest of the batch
                log.exception("could not take in a %s event", e.kind)
        self.wake()

    def _observe(self, e: Observed) -> None:
        m: Any = e.message
        if e.kind in ("rollout.completion", "rollout.scored", "trainer.step"):
            now = time.time()
            if e.kind == "trainer.step":
                if self._last_step_at is not None:
                    self._longest_step_s = max(self._longest_step_s, now - self._last_step_at)
                self._last_step_at = now
            self._last_progress = now
        if e.kind == "rollout.completion":
            self._completed(m.trajectory_id, m.version_spans)
        elif e.kind == "rollout.scored" and m.status != rollout_pb2.REWARD_STATUS_LOST:
            tid = m.completion.trajectory_id
            self._completed(tid, m.completion.version_spans)
            self._scored(tid, m.reward, reward_status_name(m.status))
        elif e.kind == "trainer.step":
            self._finish([*m.consumed_trajectory_ids, *(d.trajectory_id for d in m.dropped)])
            if self._undone(int(m.version)):
                return
            self.step = max(self.step, int(m.step))  # a replayed old report never moves it back
            if m.version:  # weights published after this step (the announcement may come later)
                self._known(int(m.version), int(m.step))
        elif e.kind == "policy.weights":
            if self.fence is not None and int(m.version) == self.fence:
                self.fence = None  # the re-announcement: from here on the trainer is on the new timeline
            elif self._undone(int(m.version), int(m.parent)):
                return
            self.version_steps[int(m.version)] = int(m.step)
            self._known(int(m.version), int(m.step))
        elif e.kind == "policy.live" and m.ok:
            if int(m.version) == self.fence or not self._undone(int(m.version)):
                self._live(int(m.version))
        elif e.kind == "dlq":
            kind = m.subject.removeprefix(self.bus.subjects.root + ".")
            if m.consumer != "ledger":  # the ledger's own refusals do not stop the pipeline
                reason = f"dead letter from {m.consumer or '?'}: {m.reason}"
                self._finish(dead_letter_trajectories(m, kind), lost=reason)

    def _undone(self, version: int, parent: int | None = None) -> bool:
        """Whether an event naming `version` (0: none) is from the timeline a rollback undid: a
        rolled-back version or a child of one, or anything before the target's re-announcement
        (version ids are never reused, so a version above the target published by then is undone
        too). The trainer finishes the step it is on before it acts on a rollback, so such reports
        can come after it; taking them in would move the step back past the rollback."""
        if version in self.rolled_back_versions or (
            parent is not None and parent in self.rolled_back_versions
        ):
            self.rolled_back_versions.add(version)
            return True
        if self.fence is not None and time.time() - self._fenced_at > self._fence_timeout_s():
            log.error(
                "no re-announcement of version %d %.0fs after the rollback (did the trainer refuse it?): "
                "taking in the trainer's reports again",
                self.fence,
                self._fence_timeout_s(),
            )
            self.fence = None
        if self.fence is None:
            return False
        if version > self.fence:
            self.rolled_back_versions.add(version)
        return True

    def _fence_timeout_s(self) -> float:
        """How long a rollback waits for its re-announcement: a trainer that refused the rollback (or
        never got it) must not have every later report ignored."""
        return max(self.cfg.request_timeout_s, 3 * self._longest_step_s)

    def _completed(self, tid: str, spans: Sequence[Any] = ()) -> None:
        group = self.groups.get(self.by_trajectory.get(tid, ""))
        if group is not None:
            group.pending.discard(tid)
            versions = {int(span.version) for span in spans}
            group.versions[tid] = versions
            oldest = min(versions, default=None)
            if oldest is not None and oldest in self.version_steps:
                group.oldest_step[tid] = self.version_steps[oldest]

    def _scored(self, tid: str, reward: float, status: str = "ok") -> None:
        group = self.groups.get(self.by_trajectory.get(tid, ""))
        if group is None:
            return
        if group.eval:
            self._finish([tid])
            return
        group.rewards[tid] = reward
        group.statuses[tid] = status
        if self.cfg.difficulty_filter and len(group.rewards) == group.request.n:
            right = sum(r >= self.cfg.difficulty_threshold for r in group.rewards.values())
            if right in (0, group.request.n):
                self.skip.add((group.request.env, group.request.prompt_key))

    def _finish(self, tids: Sequence[str], *, lost: str = "") -> None:
        """These trajectories reached a terminal status; `lost` (the reason): failed where the
        trainer never receives them, so it is told."""
        for tid in tids:
            gid = self.by_trajectory.pop(tid, None)
            group = self.groups.get(gid or "")
            if group is None:
                continue
            if lost and not group.eval:
                self._lose(group, tid, lost)
            group.open.discard(tid)
            group.pending.discard(tid)
            if not group.open:
                del self.groups[group.request.group_id]

    def _lose(self, group: Group, tid: str, reason: str) -> None:
        """Note `tid` as lost and queue its LOST notice for the trainer."""
        r = group.request
        group.lost.add(tid)
        self._lost.append(
            rollout_pb2.ScoredTrajectory(
                completion=rollout_pb2.RolloutCompletion(
                    run_id=r.run_id,
                    trajectory_id=tid,
                    request_id=r.request_id,
                    group_id=r.group_id,
                    env=r.env,
                    prompt_key=r.prompt_key,
                    sample_index=next((i for i, t in enumerate(r.trajectory_ids) if t == tid), 0),
                    group_size=r.n,
                ),
                status=rollout_pb2.REWARD_STATUS_LOST,
                status_reason=reason,
                scored_at=time.time(),
            )
        )

    def _live(self, version: int) -> None:
        self.live_version = version
        if version in self.version_steps:
            self.live_step = self.version_steps[version]

    # --- control ---------------------------------------------------------------------------------

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            now = time.time()
            for group in self.groups.values():  # time spent paused does not count toward time-outs
                group.dispatched_at = now
        self.paused = False
        self.wake()

    def rolled_back(self, result: RollbackResult) -> None:
        """The ledger rolled back to `result.version`: the trainer restarts from its step, once it
        has re-announced that version (`fence`)."""
        self.step = result.step
        self.live_version, self.live_step = result.version, result.step
        self.newest_step, self._newest_at = result.step, None
        self.rolled_back_versions |= set(result.versions)
        self.fence, self._fenced_at = result.version, time.time()
        self._finish(result.trajectory_ids)
        self.wake()

    async def _on_control(self, cmd: policy_pb2.ControlCommand) -> None:
        if cmd.run_id != self.bus.run_id:  # a command of another run, or of none, is not ours
            log.error("ignoring a control command for run %r", cmd.run_id)
            return
        if cmd.kind == policy_pb2.CONTROL_KIND_PAUSE:
            self.pause()
        elif cmd.kind == policy_pb2.CONTROL_KIND_RESUME:
            self.resume()
        elif cmd.kind == policy_pb2.CONTROL_KIND_STOP:
            self.stopped = True

    # --- the loop --------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self.paused = await self.bus.is_paused()
        if self.writer is not None:
            await self.continue_run(self.writer.ledger)
        head = await self.bus.get_head()
        if head is not None:
            self._known(head.version, head.step)
            self._live(head.version)
        sub = await self.bus.subscribe(
            self.bus.subjects.control_all, policy_pb2.ControlCommand, self._on_control
        )
        if not self.envs:
            log.warning("no [[envs]] configured: nothing to dispatch")
        try:
            while not stop.is_set():
                await self.tick()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.cfg.tick_s)
                self._wake.clear()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def tick(self) -> int:
        """One round: re-issue timed-out requests, then dispatch eval and training groups.
        Returns the number of requests published."""
        self.ticks += 1
        await self._send_lost()
        if self.paused or self.stopped or not self.envs:
            return 0
        now = time.time()
        out = self._timeouts(now)
        if self.eval_due(now):
            self.evaluated_steps.add(self.step)
            out += [self._new_request(env, ex, eval_=True, now=now) for env, ex in self._eval_examples()]
        if not self.finished:
            for _ in range(self.budget(now)):
                env, example = self.mixture.draw(self.skip if self.cfg.difficulty_filter else None)
                out.append(self._new_request(env, example, eval_=False, now=now))
        out = self._unsent + out
        self._unsent = []
        if out:
            subject = self.bus.subjects.rollout_request
            sent = [Publication(subject, r, f"request:{r.request_id}:{r.attempt}:{self.token}") for r in out]
            if not await self._publish(sent, "requests"):
                self._unsent = out
                return 0
        return len(out)

    async def _send_lost(self) -> None:
        """Publish the queued LOST notices."""
        if not self._lost:
            return
        notices, self._lost = self._lost, []
        subject = self.bus.subjects.rollout_scored
        sent = [Publication(subject, n, f"lost:{n.completion.trajectory_id}") for n in notices]
        if not await self._publish(sent, "lost-sample notices"):
            self._lost = notices + self._lost

    async def _publish(self, items: list[Publication[Any]], what: str) -> bool:
        """Publish `items`; False when NATS is away (the caller keeps them for the next round)."""
        try:
            await self.bus.publish_many(items)
        except Exception as exc:  # NATS away: sent again next round (msg ids make repeats no-ops)
            log.warning("publishing %d %s failed (%s); retrying", len(items), what, exc)
            return False
        return True

    def _eval_examples(self) -> list[Any]:
        if self._eval_cache is None:
            self._eval_cache = eval_prompts(self.envs, count=self.cfg.eval_examples, seed=self.shape.seed)
        return self._eval_cache

    def _new_request(self, env: str, example: Any, *, eval_: bool, now: float) -> rollout_pb2.RolloutRequest:
        self.seq += 1
        gid = f"{self.token}-{self.seq:07d}"
        n = self.cfg.eval_samples if eval_ else self.shape.group_size
        request = rollout_pb2.RolloutRequest(
            run_id=self.bus.run_id,
            request_id=gid,
            group_id=gid,
            env=env,
            prompt_key=example.key,
            n=n,
            sampling=self._sampling(eval_=eval_, seed=request_seed(self.shape.seed, self.seq)),
            trajectory_ids=[f"{gid}-{i}" for i in range(n)],
            eval=eval_,
            created_at=now,
            attempt=0,
        )
        set_prompt(request, example.prompt)
        ids = set(request.trajectory_ids)
        self.groups[gid] = Group(request=request, dispatched_at=now, pending=set(ids), open=set(ids))
        self.by_trajectory.update((tid, gid) for tid in ids)
        if not eval_:
            self.dispatched_groups += 1
        return request

    def _sampling(self, *, eval_: bool, seed: int) -> rollout_pb2.SamplingParams:
        s = self.cfg.sampling
        return rollout_pb2.SamplingParams(
            temperature=self.cfg.eval_temperature if eval_ else s.temperature,
            top_p=1.0 if eval_ else s.top_p,
            top_k=0 if eval_ else s.top_k,
            max_tokens=s.max_tokens,
            stop=s.stop,
            seed=seed,
        )

    def _timeouts(self, now: float) -> list[rollout_pb2.RolloutRequest]:
        again: list[rollout_pb2.RolloutRequest] = []
        failed: list[str] = []
        for group in list(self.groups.values()):
            if not group.pending or now - group.dispatched_at < self.cfg.request_timeout_s:
                continue
            if group.reissuable and group.request.attempt + 1 < self.cfg.max_attempts:
                group.request.attempt += 1
                group.dispatched_at = now
                again.append(group.request)
                self.reissued += 1
                log.warning(
                    "re-issuing request %s (attempt %d)", group.request.request_id, group.request.attempt
                )
            else:
                failed += sorted(group.pending)
        if failed:
            reason = (
                f"no completion after {self.cfg.max_attempts} attempts of {self.cfg.request_timeout_s:g}s"
            )
            log.error("%d samples failed: %s", len(failed), reason)
            if self.writer is not None:
                self.writer.enqueue(
                    Rows(
                        trajectories=[
                            {
                                "run_id": self.bus.run_id,
                                "trajectory_id": t,
                                "status": "failed",
                                "reason": reason,
                                "finished_at": datetime.now(UTC),
                            }
                            for t in failed
                        ]
                    )
                )
            self._finish(failed, lost=reason)
        return again
