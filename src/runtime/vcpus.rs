//! The set of vCPU threads as the VM owner drives it: pause, resume, run work on every vCPU,
//! each acknowledged within a deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;
use tokio::sync::oneshot;

use super::run_delay::RunDelay;
use super::start_gate::{Place, StartGate};
use super::throttle::Throttle;
use super::vcpu::{Kicker, PauseAck, VcpuError, VcpuEvent, VcpuHandle, ACK_DEADLINE};
use super::GuestEvents;
use crate::machine::devices::Devices;

/// Every vCPU thread of the VM.
pub struct Vcpus {
    handles: Vec<VcpuHandle>,
    /// Each thread's run-queue delay, in `handles` order.
    run_delays: Vec<Option<RunDelay>>,
    running: bool,
    /// When each vCPU left the guest at the last pause, in vCPU order; empty unless that pause
    /// stopped running vCPUs.
    left_guest: Vec<Instant>,
    throttle: Throttle,
}

impl Vcpus {
    /// Starts one thread per vCPU, all paused.
    pub fn spawn(
        vcpus: Vec<VcpuFd>,
        devices: Arc<Devices>,
        guest_events: GuestEvents,
    ) -> Result<Self, VcpuError> {
        let throttle = Throttle::default();
        let handles = vcpus
            .into_iter()
            .enumerate()
            .map(|(index, vcpu)| {
                let events = guest_events.clone();
                VcpuHandle::spawn(
                    index as u32,
                    vcpu,
                    devices.clone(),
                    events,
                    throttle.clone(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let run_delays = handles
            .iter()
            .map(|handle| RunDelay::of_thread(handle.thread_id))
            .collect();
        Ok(Self {
            handles,
            run_delays,
            running: false,
            left_guest: Vec::new(),
            throttle,
        })
    }

    /// The share of time the vCPUs are held back (auto-converge).
    pub fn throttle(&self) -> &Throttle {
        &self.throttle
    }

    pub fn kicker(&self) -> Kicker {
        Kicker {
            threads: self
                .handles
                .iter()
                .filter_map(VcpuHandle::pthread)
                .collect(),
        }
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Whether the vCPUs run guest code (as the last pause or resume that succeeded, or start
    /// gate that opened, left them).
    pub fn running(&self) -> bool {
        self.running
    }

    pub fn thread_ids(&self) -> Vec<i32> {
        self.handles.iter().map(|h| h.thread_id).collect()
    }

    /// When each vCPU left the guest at the last pause, in vCPU order, if that pause stopped
    /// running vCPUs: as it heard the pause, or before that if it was already out (serving an
    /// exit, or its thread waiting for a core on a busy host). The caller bounds them by when
    /// it asked for the pause.
    pub fn left_guest(&self) -> &[Instant] {
        &self.left_guest
    }

    /// Stops every vCPU outside `KVM_RUN` with pending I/O completed.
    pub async fn pause(&mut self) -> Result<(), VcpuError> {
        let pauses = self.send_pauses(|_| Ok(()))?;
        self.note_left_guest(pauses).await
    }

    /// Sends every vCPU a pause, then `after(vcpu)`. A pause once sent takes effect even if its
    /// acknowledgement is late or lost, so the vCPUs count as paused from here on: whoever
    /// resumes must not skip them.
    fn send_pauses(
        &mut self,
        mut after: impl FnMut(&VcpuHandle) -> Result<(), VcpuError>,
    ) -> Result<SentPauses, VcpuError> {
        let mut sent = SentPauses {
            acks: Vec::with_capacity(self.handles.len()),
            baselines: Vec::with_capacity(self.handles.len()),
            were_running: self.running,
            read_again: Vec::new(),
        };
        self.running = false;
        self.left_guest.clear();
        for (handle, run_delay) in self.handles.iter().zip(&self.run_delays) {
            let (ack, acked) = oneshot::channel();
            let read_at = Instant::now();
            // Paused vCPUs left the guest long ago: no /proc read for them.
            let before = run_delay
                .as_ref()
                .filter(|_| sent.were_running)
                .and_then(RunDelay::read_if_runnable);
            handle.queue(VcpuEvent::Pause {
                ack,
                measure: before.is_some(),
            })?;
            // Queued before the kick, so that the vCPU finds its work in the same wake-up as
            // the pause. The kick can hand it this thread's core at once (after a busy transfer
            // the kernel was seen to place a woken vCPU there while the other core idled): this
            // thread then goes on only once the vCPU sleeps again, and work queued after the
            // kick cost each vCPU a second wake-up and its thread's wait for the core. The
            // pause is kicked even if the work could not be queued: it is sent either way.
            let queued = after(handle);
            handle.kick();
            queued?;
            // The kernel adds a wait to the delay when the wait ends: a thread still waiting at
            // the kick has its whole wait counted against `before`. But if this thread waited
            // for a core between the read and the kick, the vCPU may have got its core and run
            // the guest meanwhile; a read after the kick leaves out what it waited before that.
            let baseline = match before {
                Some(_) if read_at.elapsed() > STALE_DELAY_READ => {
                    sent.read_again.push(handle.index);
                    run_delay.as_ref().and_then(RunDelay::read)
                }
                before => before,
            };
            sent.acks.push((handle.index, acked));
            sent.baselines.push(baseline);
        }
        Ok(sent)
    }

    /// Waits for the pauses' acknowledgements and, if the vCPUs ran, notes when each left the
    /// guest (paused vCPUs answer with when they heard the pause, which says nothing of the
    /// guest).
    async fn note_left_guest(&mut self, sent: SentPauses) -> Result<(), VcpuError> {
        let acks = collect(sent.acks).await?;
        if !sent.read_again.is_empty() {
            // Logged here, not between the kicks, which it would hold up.
            tracing::debug!(vcpus = ?sent.read_again, "run-queue delay read again after the kick");
        }
        if sent.were_running {
            self.left_guest = acks
                .iter()
                .zip(sent.baselines)
                .enumerate()
                .map(|(index, (ack, baseline))| {
                    let waited = run_queue_wait(ack, baseline);
                    if ack.out_since.is_none() && !waited.is_zero() {
                        tracing::debug!(
                            vcpu = index,
                            waited_us = waited.as_micros() as u64,
                            "vCPU was waiting for a core when the pause came"
                        );
                    }
                    left_guest(ack, baseline)
                })
                .collect();
        }
        Ok(())
    }

    /// Lets every vCPU run the guest again.
    pub async fn resume(&mut self) -> Result<(), VcpuError> {
        let mut acks = Vec::with_capacity(self.handles.len());
        for handle in &self.handles {
            let (ack, acked) = oneshot::channel();
            handle.send(VcpuEvent::Resume(ack))?;
            acks.push((handle.index, acked));
        }
        collect(acks).await?;
        self.running = true;
        Ok(())
    }

    /// Pauses every vCPU and runs `work` on each right after, in the same wake-up of its
    /// thread (one hand-off fewer than [`Vcpus::pause`] then [`Vcpus::on_each`]; on a busy
    /// host each can cost a scheduler slice). Returns once every vCPU is out of the guest,
    /// with `work` still running: the caller gets on with what needs only paused vCPUs, and
    /// collects the results (in vCPU order) after.
    pub async fn pause_then<T, F>(&mut self, work: F) -> Result<Queued<T>, VcpuError>
    where
        T: Send + 'static,
        F: Fn(u32, &mut VcpuFd) -> T + Send + Sync + 'static,
    {
        let work = Arc::new(work);
        let mut answers = Vec::with_capacity(self.handles.len());
        // Queued behind the pause, so a vCPU that was running cannot run in between.
        let pauses = self
            .send_pauses(|handle| handle.queue(task(handle.index, work.clone(), &mut answers)))?;
        self.note_left_guest(pauses).await?;
        Ok(Queued { answers })
    }

    /// Runs `work` on every (paused) vCPU's thread and collects the results in vCPU order.
    pub async fn on_each<T, F>(&self, work: F) -> Result<Vec<T>, VcpuError>
    where
        T: Send + 'static,
        F: Fn(u32, &mut VcpuFd) -> T + Send + Sync + 'static,
    {
        let work = Arc::new(work);
        let mut answers = Vec::with_capacity(self.handles.len());
        for handle in &self.handles {
            handle.send(task(handle.index, work.clone(), &mut answers))?;
        }
        collect(answers).await
    }

    /// Runs `work` on every paused vCPU's thread, after which each vCPU goes into the guest on
    /// its own as soon as `gate` opens, without waiting for the owner. Each arrives at the gate
    /// as its work ends, ready if the work succeeded: the gate opens only once every vCPU's
    /// work succeeded and the owner arrived too. Returns at once; the owner must arrive at the
    /// gate or shut it, and then hand the result to [`Vcpus::finish_start`].
    pub fn start_after<T, E, F>(
        &self,
        work: F,
        gate: &Arc<StartGate>,
    ) -> Result<Starting<Result<T, E>>, VcpuError>
    where
        T: Send + 'static,
        E: Send + 'static,
        F: Fn(u32, &mut VcpuFd) -> Result<T, E> + Send + Sync + 'static,
    {
        let work = Arc::new(work);
        let mut answers = Vec::with_capacity(self.handles.len());
        let mut entries = Vec::with_capacity(self.handles.len());
        for handle in &self.handles {
            let (index, work) = (handle.index, work.clone());
            // Work the thread refuses (its vCPU runs) or never runs is dropped, its place with
            // it, which shuts the gate.
            let place = Place::new(gate.clone());
            let restore = move |vcpu: &mut VcpuFd| {
                let result = work(index, vcpu);
                place.arrive(result.is_ok());
                result
            };
            let (ack, entered) = oneshot::channel();
            handle.queue(task_once(index, restore, &mut answers))?;
            handle.send(VcpuEvent::StartAt {
                gate: gate.clone(),
                ack,
            })?;
            entries.push((handle.index, entered));
        }
        Ok(Starting {
            answers,
            entries,
            gate: gate.clone(),
        })
    }

    /// Waits for the work [`Vcpus::start_after`] queued and for the vCPUs at the gate, all
    /// within one [`ACK_DEADLINE`], then settles the gate: the owner has arrived or left by
    /// now, and a vCPU whose work ends later stays out. Returns the work's results (in vCPU
    /// order, unless a vCPU did not answer in time) and how the start went.
    pub async fn finish_start<T>(
        &mut self,
        starting: Starting<T>,
    ) -> (Result<Vec<T>, VcpuError>, GateOutcome) {
        let deadline = tokio::time::Instant::now() + ACK_DEADLINE;
        let results = collect_by(starting.answers, deadline).await;
        let entries = collect_by(starting.entries, deadline).await;
        let opened = starting.gate.shut();
        if opened {
            // Every vCPU goes in as its thread gets a core, whether or not it answered.
            self.running = true;
        }
        let entered = match entries {
            // The gate lets every vCPU in or none.
            Ok(entries) if opened => entries.into_iter().collect(),
            _ => None,
        };
        (results, GateOutcome { opened, entered })
    }

    /// Ends every vCPU thread and waits for each (bounded).
    pub fn finish(&mut self) {
        for handle in &mut self.handles {
            handle.finish();
        }
        self.running = false;
    }
}

/// Work queued on the vCPU threads, its results still to come.
pub struct Queued<T> {
    answers: Vec<(u32, oneshot::Receiver<T>)>,
}

impl<T> Queued<T> {
    /// Waits for every vCPU's result, in vCPU order.
    pub async fn collect(self) -> Result<Vec<T>, VcpuError> {
        collect(self.answers).await
    }
}

/// Work queued on the vCPU threads ahead of their start at a gate.
pub struct Starting<T> {
    answers: Vec<(u32, oneshot::Receiver<T>)>,
    entries: Vec<(u32, oneshot::Receiver<Option<Instant>>)>,
    gate: Arc<StartGate>,
}

/// How the vCPUs' start at a gate ended.
#[derive(Debug)]
pub struct GateOutcome {
    /// Every vCPU and the owner arrived ready: the guest runs.
    pub opened: bool,
    /// When each vCPU went into the guest, in vCPU order, if every one said so in time.
    pub entered: Option<Vec<Instant>>,
}

/// Pauses sent, awaiting their acknowledgements.
struct SentPauses {
    acks: Vec<(u32, oneshot::Receiver<PauseAck>)>,
    /// Each vCPU's run-queue delay its wait is counted from, in the same order.
    baselines: Vec<Option<Duration>>,
    were_running: bool,
    /// The vCPUs whose delay was read again after the kick.
    read_again: Vec<u32>,
}

/// Longer than reading a delay and sending a kick take: the owner's thread was preempted.
const STALE_DELAY_READ: Duration = Duration::from_micros(50);

/// When a vCPU left the guest. If it was already out at the kick (serving an exit, or held
/// back by the throttle), when that exit came. Otherwise as it heard the pause, less what it
/// had waited for a core since `baseline`.
fn left_guest(ack: &PauseAck, baseline: Option<Duration>) -> Instant {
    if let Some(out_since) = ack.out_since {
        return out_since;
    }
    let waited = run_queue_wait(ack, baseline);
    ack.at.checked_sub(waited).unwrap_or(ack.at)
}

/// How long a vCPU had waited for a core since `baseline` when it heard the pause.
fn run_queue_wait(ack: &PauseAck, baseline: Option<Duration>) -> Duration {
    match (baseline, ack.run_delay) {
        (Some(before), Some(now)) => now.saturating_sub(before),
        _ => Duration::ZERO,
    }
}

/// `work` for vCPU `index` as an event; its result goes to the channel added to `answers`.
fn task<T, F>(index: u32, work: Arc<F>, answers: &mut Vec<(u32, oneshot::Receiver<T>)>) -> VcpuEvent
where
    T: Send + 'static,
    F: Fn(u32, &mut VcpuFd) -> T + Send + Sync + 'static,
{
    task_once(index, move |vcpu| work(index, vcpu), answers)
}

/// `work` for vCPU `index` alone as an event; its result goes to the channel added to
/// `answers`.
fn task_once<T, F>(index: u32, work: F, answers: &mut Vec<(u32, oneshot::Receiver<T>)>) -> VcpuEvent
where
    T: Send + 'static,
    F: FnOnce(&mut VcpuFd) -> T + Send + 'static,
{
    let (reply, answer) = oneshot::channel();
    answers.push((index, answer));
    VcpuEvent::Run(Box::new(move |vcpu| {
        let _ = reply.send(work(vcpu));
    }))
}

/// Waits for every vCPU's answer, all within one [`ACK_DEADLINE`]: the vCPUs work in parallel,
/// and a deadline per answer would let many slow vCPUs add up past what callers allow.
async fn collect<T>(answers: Vec<(u32, oneshot::Receiver<T>)>) -> Result<Vec<T>, VcpuError> {
    collect_by(answers, tokio::time::Instant::now() + ACK_DEADLINE).await
}

async fn collect_by<T>(
    answers: Vec<(u32, oneshot::Receiver<T>)>,
    deadline: tokio::time::Instant,
) -> Result<Vec<T>, VcpuError> {
    let mut values = Vec::with_capacity(answers.len());
    for (index, answer) in answers {
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(value)) => values.push(value),
            Ok(Err(_)) => return Err(VcpuError::Gone { index }),
            Err(_) => return Err(VcpuError::Timeout { index }),
        }
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(run_delay: Option<u64>) -> PauseAck {
        PauseAck {
            at: Instant::now(),
            run_delay: run_delay.map(Duration::from_micros),
            out_since: None,
        }
    }

    fn us(us: u64) -> Duration {
        Duration::from_micros(us)
    }

    #[test]
    fn a_vcpu_left_the_guest_when_its_last_wait_for_a_core_began() {
        let paused = ack(Some(13_000));
        let left = left_guest(&paused, Some(us(10_000)));
        assert_eq!(paused.at - left, us(3_000));
    }

    #[test]
    fn without_both_readings_a_vcpu_left_the_guest_at_the_pause() {
        let unmeasured = ack(None);
        assert_eq!(left_guest(&unmeasured, Some(Duration::ZERO)), unmeasured.at);
        let halted = ack(Some(5_000));
        assert_eq!(left_guest(&halted, None), halted.at);
    }

    #[test]
    fn a_baseline_read_after_the_wait_was_counted_gives_no_wait() {
        let paused = ack(Some(5_000));
        assert_eq!(left_guest(&paused, Some(us(6_000))), paused.at);
    }

    #[test]
    fn a_vcpu_already_out_of_the_guest_left_it_at_its_exit() {
        let mut paused = ack(Some(5_000));
        let exited = paused.at - us(700);
        paused.out_since = Some(exited);
        // Whatever it waited for since, serving the exit, the guest stopped at the exit.
        assert_eq!(left_guest(&paused, Some(us(4_500))), exited);
        assert_eq!(left_guest(&paused, None), exited);
    }
}
