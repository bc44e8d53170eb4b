//! Deadlines for the proxy workers: the ones every request sets and almost never reaches
//! (the idle deadline armed on each keep-alive connection between requests, hyper's header-read
//! timeout on connections it serves, and the upstream timeout of each call).
//!
//! tokio's timer takes its driver's lock and links an entry into its wheel on a sleep's first
//! poll, then does both again to unlink it on drop: twice per request for deadlines that do not
//! fire. Here a worker thread keeps its deadlines in a table of its own (no lock: one thread
//! uses it), arming one is taking a free slot, and dropping it gives the slot back. One sweeper
//! task per worker sleeps on a single tokio timer until the earliest deadline it knows of, then
//! wakes whatever has expired and looks for the next. Cancelled deadlines are not searched out
//! when they go; the sweeper finds them gone when it wakes, so with steady traffic it wakes about
//! once per timeout period rather than once per request. Deadlines fire on time (tokio's
//! millisecond), not rounded to a tick.
//!
//! Threads without a table (the admin server, tests that call the gateway directly) get tokio's
//! own sleep: [`sleep_until`] picks one or the other when it is first polled.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// One thread's deadlines.
#[derive(Default)]
struct Table {
    /// Unique among all tables ever made, so a sleep moved to another thread (possible: sleeps
    /// are `Send`, though the proxy never moves one) never touches this table's slots.
    id: u64,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// No deadline armed in this table is earlier (some may have been cancelled since).
    next_due: Option<Instant>,
    /// The sweeper, woken when a deadline earlier than `next_due` is armed.
    sweeper: Option<Waker>,
}

#[derive(Default)]
struct Slot {
    /// Bumped whenever the slot is let go (fired or cancelled): a sleep whose generation no
    /// longer matches has fired, or was cancelled and cannot be polled any more.
    generation: u64,
    /// `Some` while armed.
    waker: Option<Waker>,
    deadline: Option<Instant>,
}

impl Table {
    /// Arms `deadline` for `waker`; also returns the sweeper to wake (outside the table's
    /// borrow) when this deadline is earlier than any it sleeps towards.
    fn arm(&mut self, deadline: Instant, waker: &Waker) -> (usize, u64, Option<Waker>) {
        let index = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot::default());
            self.slots.len() - 1
        });
        let slot = &mut self.slots[index];
        slot.waker = Some(waker.clone());
        slot.deadline = Some(deadline);
        let mut sweeper = None;
        if self.next_due.is_none_or(|due| deadline < due) {
            self.next_due = Some(deadline);
            sweeper = self.sweeper.clone();
        }
        (index, slot.generation, sweeper)
    }

    fn release(&mut self, index: usize) -> Option<Waker> {
        let slot = &mut self.slots[index];
        slot.generation += 1;
        slot.deadline = None;
        self.free.push(index);
        slot.waker.take()
    }

    /// Lets go of every deadline at or before `now` (their wakers go to `woken`) and finds the
    /// earliest one left.
    fn expire(&mut self, now: Instant, woken: &mut Vec<Waker>) {
        let mut next = None::<Instant>;
        for index in 0..self.slots.len() {
            let Some(deadline) = self.slots[index].deadline else {
                continue;
            };
            if deadline <= now {
                woken.extend(self.release(index));
            } else if next.is_none_or(|n| deadline < n) {
                next = Some(deadline);
            }
        }
        self.next_due = next;
    }
}

thread_local! {
    static TABLE: RefCell<Option<Table>> = const { RefCell::new(None) };
}

static TABLE_IDS: AtomicU64 = AtomicU64::new(1);

/// Gives this thread a deadline table and returns the sweeper that fires its deadlines, to be
/// spawned on the thread's current-thread runtime, where it runs until the runtime ends.
/// Sleeps armed on this thread use the table from then on. On any other runtime (or none) it
/// installs nothing, since a multi-thread runtime may poll the sweeper on another thread, and
/// this thread's sleeps keep using tokio's timer.
pub fn install() -> impl Future<Output = ()> + Send + 'static {
    let current_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
    if current_thread {
        TABLE.with(|t| {
            *t.borrow_mut() = Some(Table {
                id: TABLE_IDS.fetch_add(1, Ordering::Relaxed),
                ..Table::default()
            })
        });
    }
    Sweeper {
        sleep: None,
        target: None,
    }
}

struct Sweeper {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    target: Option<Instant>,
}

impl Future for Sweeper {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut woken = Vec::new();
        loop {
            // None: no table on this thread (not a current-thread runtime), nothing to sweep.
            let Some(due) = TABLE.with(|t| {
                let mut t = t.borrow_mut();
                let t = t.as_mut()?;
                if !t.sweeper.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    t.sweeper = Some(cx.waker().clone());
                }
                Some(t.next_due)
            }) else {
                return Poll::Ready(());
            };
            let Some(due) = due else {
                // Nothing armed: an arming wakes this task.
                return Poll::Pending;
            };
            if self.target != Some(due) {
                let at = tokio::time::Instant::from_std(due);
                match &mut self.sleep {
                    Some(sleep) => sleep.as_mut().reset(at),
                    None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
                }
                self.target = Some(due);
            }
            if let Some(sleep) = &mut self.sleep {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            self.target = None;
            // tokio's clock, so a paused test clock is honoured.
            let now = tokio::time::Instant::now().into_std();
            TABLE.with(|t| {
                if let Some(t) = t.borrow_mut().as_mut() {
                    t.expire(now, &mut woken);
                }
            });
            // Woken outside the borrow: a waker may run code that arms a deadline.
            for w in woken.drain(..) {
                w.wake();
            }
        }
    }
}

/// A sleep until a deadline: in this thread's table when it has one, else tokio's.
pub struct Sleep {
    deadline: Instant,
    state: State,
}

enum State {
    Unarmed,
    Armed {
        table: u64,
        index: usize,
        generation: u64,
    },
    Done,
    Tokio(Pin<Box<tokio::time::Sleep>>),
}

/// Sleeps until `deadline`. Nothing is armed until the first poll.
pub fn sleep_until(deadline: Instant) -> Sleep {
    Sleep {
        deadline,
        state: State::Unarmed,
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.deadline;
        loop {
            match &mut self.state {
                State::Done => return Poll::Ready(()),
                State::Tokio(sleep) => return sleep.as_mut().poll(cx),
                State::Unarmed => {
                    let armed = TABLE.with(|t| {
                        let mut t = t.borrow_mut();
                        let t = t.as_mut()?;
                        let (index, generation, sweeper) = t.arm(deadline, cx.waker());
                        let state = State::Armed {
                            table: t.id,
                            index,
                            generation,
                        };
                        Some((state, sweeper))
                    });
                    match armed {
                        Some((state, sweeper)) => {
                            self.state = state;
                            if let Some(sweeper) = sweeper {
                                sweeper.wake();
                            }
                            return Poll::Pending;
                        }
                        None => {
                            self.state = State::Tokio(Box::pin(tokio::time::sleep_until(
                                tokio::time::Instant::from_std(deadline),
                            )))
                        }
                    }
                }
                State::Armed {
                    table,
                    index,
                    generation,
                } => {
                    let (table, index, generation) = (*table, *index, *generation);
                    // None: this is not the thread the deadline was armed on.
                    let fired = TABLE.with(|t| {
                        let mut t = t.borrow_mut();
                        let t = t.as_mut().filter(|t| t.id == table)?;
                        let slot = &mut t.slots[index];
                        if slot.generation != generation {
                            return Some(true);
                        }
                        if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            slot.waker = Some(cx.waker().clone());
                        }
                        Some(false)
                    });
                    match fired {
                        Some(true) => self.state = State::Done,
                        Some(false) => return Poll::Pending,
                        // Moved: the old slot fires unheard and frees itself; arm here.
                        None => self.state = State::Unarmed,
                    }
                }
            }
        }
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let State::Armed {
            table,
            index,
            generation,
        } = self.state
        {
            // `try_with`: a sleep dropped while its thread's locals are torn down has nothing
            // to give back.
            let _ = TABLE.try_with(|t| {
                if let Ok(mut t) = t.try_borrow_mut() {
                    if let Some(t) = t.as_mut().filter(|t| t.id == table) {
                        if t.slots[index].generation == generation {
                            drop(t.release(index));
                        }
                    }
                }
            });
        }
    }
}

/// hyper's timer on top of [`sleep_until`] (the header-read timeout of every connection).
#[derive(Clone, Copy, Debug, Default)]
pub struct WorkerTimer;

impl hyper::rt::Timer for WorkerTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(sleep_until(Instant::now() + duration))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(sleep_until(deadline))
    }
}

impl hyper::rt::Sleep for Sleep {}

/// A deadline passed before the future finished.
#[derive(Debug, PartialEq, Eq)]
pub struct Elapsed;

pin_project_lite::pin_project! {
    /// [`timeout`]'s future. A struct rather than an `async fn`, so the wrapped future (the
    /// upstream call: large) is moved in once and polled where it lies.
    pub struct Timeout<F> {
        #[pin]
        fut: F,
        sleep: Sleep,
    }
}

/// Runs `fut` until it finishes or `duration` has passed. The deadline is armed only if the
/// future does not finish on its first poll.
pub fn timeout<F: Future>(duration: Duration, fut: F) -> Timeout<F> {
    Timeout {
        fut,
        sleep: sleep_until(Instant::now() + duration),
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        match Pin::new(this.sleep).poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A current-thread runtime with a table and its sweeper, on the paused test clock.
    fn worker_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime")
    }

    fn slots_in_use() -> usize {
        TABLE.with(|t| {
            let t = t.borrow();
            let t = t.as_ref().expect("table");
            t.slots.len() - t.free.len()
        })
    }

    #[test]
    fn deadlines_fire_in_order_and_on_time_whatever_order_they_were_armed_in() {
        worker_runtime().block_on(async {
            tokio::spawn(install());
            let start = tokio::time::Instant::now();
            let at = move |ms| start.into_std() + Duration::from_millis(ms);
            let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let mut tasks = Vec::new();
            // The latest first: each earlier one must pull the sweeper forward.
            for ms in [300u64, 200, 50, 120] {
                let order = order.clone();
                tasks.push(tokio::spawn(async move {
                    sleep_until(at(ms)).await;
                    let waited = tokio::time::Instant::now() - start;
                    order.lock().unwrap().push(ms);
                    waited
                }));
                // Let the sweeper settle on the deadlines so far before an earlier one comes.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            for (task, ms) in tasks.into_iter().zip([300u64, 200, 50, 120]) {
                let waited = task.await.unwrap();
                assert!(
                    waited >= Duration::from_millis(ms) && waited < Duration::from_millis(ms + 2),
                    "the {ms} ms deadline fired after {waited:?}"
                );
            }
            assert_eq!(*order.lock().unwrap(), vec![50, 120, 200, 300]);
            assert_eq!(slots_in_use(), 0, "fired deadlines give their slots back");
        });
    }

    #[test]
    fn cancelled_deadlines_never_fire_and_their_slots_are_reused() {
        worker_runtime().block_on(async {
            tokio::spawn(install());
            // A request's life: its deadline is armed, then the work finishes first.
            for i in 0..10_000u64 {
                let out = timeout(Duration::from_secs(5), async {
                    tokio::task::yield_now().await;
                    i
                })
                .await;
                assert_eq!(out, Ok(i));
            }
            let size = TABLE.with(|t| t.borrow().as_ref().map(|t| t.slots.len()));
            assert_eq!(size, Some(1), "one request at a time needs one slot");
            assert_eq!(slots_in_use(), 0);
            // Past all those deadlines: nothing left to fire, the sweeper finds them gone.
            tokio::time::sleep(Duration::from_secs(6)).await;
            assert_eq!(slots_in_use(), 0);
        });
    }

    #[test]
    fn a_timeout_ends_work_that_outlives_it_and_only_that() {
        worker_runtime().block_on(async {
            tokio::spawn(install());
            let slow = timeout(Duration::from_millis(100), std::future::pending::<()>());
            let quick = timeout(
                Duration::from_millis(100),
                tokio::time::sleep(Duration::from_millis(40)),
            );
            let (slow, quick) = tokio::join!(slow, quick);
            assert_eq!(slow, Err(Elapsed));
            assert_eq!(quick, Ok(()));
            // Ready at once: never armed.
            assert_eq!(timeout(Duration::ZERO, async { 7 }).await, Ok(7));
            assert_eq!(slots_in_use(), 0);
        });
    }

    #[test]
    fn threads_without_a_table_use_tokios_timer() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            // A multi-thread runtime gets no table: its sweeper could run on another thread.
            tokio::spawn(install()).await.unwrap();
            assert!(TABLE.with(|t| t.borrow().is_none()));
            let started = Instant::now();
            let out = timeout(Duration::from_millis(30), std::future::pending::<()>()).await;
            assert_eq!(out, Err(Elapsed));
            assert!(started.elapsed() >= Duration::from_millis(30));
        });
    }
}
