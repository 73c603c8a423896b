//! The response future: a state machine that sequences the store steps around the
//! inner service.
//!
//! ```text
//! read:   [answered at once in `call`] ──────────────┐
//!         Loading (access, takeover, seed) ──> Reading ──> (Finishing: undo a seed, adopt a tag) ──> response
//! write:  (Checking: access) ──> Collecting (body, unless streamed) ──> [reserve at once] ──┐
//!                                                         └─> Reserving (awaited) ──> Writing (deadline) ──> (Finishing: settle) ──> response
//! either: Ready (a response the layer wrote) | Passthrough (not ours to version)
//! ```
//!
//! A store that answers at once (the memory store) takes no boxed future on the common
//! paths: the read's load runs in `call`, the write's reserve and settle in `poll`. A
//! store step that has to be awaited is a boxed future (store calls are `async_trait`
//! calls anyway); the inner service's future is pinned in place. A write's lease is
//! owned by a `WriteGuard` that settles itself if this future is dropped (a client that
//! disconnects mid-write).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use http::{header, request::Parts, HeaderMap, Method, Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use crate::{
    access::AccessFuture,
    body::ResponseBody,
    etag::EntityTag,
    evaluate::{evaluate, Decision, Preconditions},
    layer::Config,
    protocol::{
        self, PendingSeed, ReadStart, Reserve, ReserveStep, Settled, Settlement, WriteGuard,
    },
    request_body::{BufferableBody, CollectBody, WatchFlag},
    response::{
        into_not_modified, not_modified, remove_validators, set_new_validators, set_validators,
        Early, Problem,
    },
    store::{Entry, StoreError, Version},
};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Output<B, E> = Result<Response<ResponseBody<B>>, E>;

pin_project! {
    /// Response future of [`PreconditionService`](crate::PreconditionService).
    pub struct ResponseFuture<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ReqBody: BufferableBody,
    {
        #[pin]
        state: State<S, ReqBody, ResBody>,
        ctx: Option<Ctx>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ReqBody: BufferableBody,
    {
        Ready { response: Option<Response<ResponseBody<ResBody>>> },
        Passthrough { #[pin] future: S::Future },
        Loading {
            load: BoxFuture<Result<Result<ReadStart, StoreError>, Early>>,
            inner: Option<S>,
            request: Option<Request<ReqBody>>,
        },
        Reading { #[pin] future: S::Future, read: Option<ReadState> },
        Checking {
            check: AccessFuture,
            request: Option<Request<ReqBody>>,
            inner: Option<S>,
        },
        Collecting {
            #[pin] body: CollectBody<ReqBody>,
            parts: Option<Parts>,
            inner: Option<S>,
        },
        Reserving {
            reserve: BoxFuture<Result<WriteGuard, Problem>>,
            request: Option<Request<ReqBody>>,
            inner: Option<S>,
            watch: Option<WatchFlag>,
        },
        Writing {
            #[pin] future: S::Future,
            // The guard's deadline, armed the first time the handler is not done: a
            // handler that answers at once costs no timer.
            #[pin] deadline: Option<Sleep>,
            guard: Option<WriteGuard>,
        },
        Finishing { finish: BoxFuture<Output<ResBody, S::Error>> },
    }
}

/// What a request of ours carries from one state to the next.
pub(crate) struct Ctx {
    config: Arc<Config>,
    key: Arc<str>,
    method: Method,
    pre: Preconditions,
}

impl Ctx {
    pub(crate) fn new(
        config: Arc<Config>,
        key: Arc<str>,
        method: Method,
        pre: Preconditions,
    ) -> Self {
        Self {
            config,
            key,
            method,
            pre,
        }
    }

    /// The context of a write whose reserve took the preconditions.
    pub(crate) fn of_write(config: Arc<Config>, key: Arc<str>, method: Method) -> Self {
        Self {
            config,
            key,
            method,
            pre: Preconditions::default(),
        }
    }
}

/// What the read path learned from the store before running the handler.
enum ReadState {
    /// The store failed: serve the handler's answer without validators.
    StoreFailed,
    /// The resource has a committed version (in the entry), and the preconditions were
    /// evaluated against it: a `2xx` from the handler becomes that decision's answer.
    Versioned {
        entry: Entry,
        decision: Decision,
        /// This read is seeding the version: confirmed on a `2xx`, withdrawn otherwise.
        seed: Option<Box<PendingSeed>>,
    },
    /// No committed version (a create in flight).
    Unversioned,
}

impl<S, ReqBody, ResBody> ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: BufferableBody,
{
    fn with_state(state: State<S, ReqBody, ResBody>, ctx: Option<Ctx>) -> Self {
        Self { state, ctx }
    }

    pub(crate) fn passthrough(future: S::Future) -> Self {
        Self::with_state(State::Passthrough { future }, None)
    }

    pub(crate) fn problem(problem: Problem) -> Self {
        Self::with_state(
            State::Ready {
                response: Some(problem.into_response()),
            },
            None,
        )
    }

    /// A read whose store step was answered at once (a store in the process, no
    /// access check): the handler runs, or the layer answers, from here.
    pub(crate) fn read_loaded(
        loaded: Result<ReadStart, StoreError>,
        mut inner: S,
        request: Request<ReqBody>,
        ctx: Ctx,
    ) -> Self {
        let state = match read_step(&ctx, loaded) {
            ReadStep::Run(read) => State::Reading {
                future: inner.call(request),
                read: Some(read),
            },
            ReadStep::Answer(response) => State::Ready {
                response: Some(response),
            },
        };
        Self::with_state(state, Some(ctx))
    }

    /// A read whose store step (with the access check before it) is still to await.
    pub(crate) fn read(
        load: BoxFuture<Result<Result<ReadStart, StoreError>, Early>>,
        inner: S,
        request: Request<ReqBody>,
        ctx: Ctx,
    ) -> Self {
        let state = State::Loading {
            load,
            inner: Some(inner),
            request: Some(request),
        };
        Self::with_state(state, Some(ctx))
    }

    /// A write: the access check if the layer has one, the body (unless streamed),
    /// the reserve, the handler, the settle. Without a boxed future while the store
    /// answers at once.
    // Inlined: it returns the whole future, which a call would copy once more.
    #[inline(always)]
    pub(crate) fn write(
        request: Request<ReqBody>,
        check: Option<AccessFuture>,
        inner: S,
        mut ctx: Option<Ctx>,
    ) -> Self {
        let mut inner = Some(inner);
        let state = match check {
            Some(check) => State::Checking {
                check,
                request: Some(request),
                inner,
            },
            None => admitted_write(&mut ctx, &mut inner, request),
        };
        Self::with_state(state, ctx)
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: BufferableBody,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Output = Output<ResBody, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let next = match this.state.as_mut().project() {
                StateProj::Ready { response } => {
                    let response = response
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(Ok(response));
                }
                StateProj::Passthrough { future } => {
                    let response = ready!(future.poll(cx))?;
                    return Poll::Ready(Ok(response.map(ResponseBody::inner)));
                }
                StateProj::Finishing { finish } => return finish.as_mut().poll(cx),

                StateProj::Loading {
                    load,
                    inner,
                    request,
                } => {
                    let loaded = match ready!(load.as_mut().poll(cx)) {
                        Ok(loaded) => loaded,
                        Err(early) => {
                            this.state.set(State::Ready {
                                response: Some(early.into_response()),
                            });
                            continue;
                        }
                    };
                    let ctx = this.ctx.as_ref().expect("read context");
                    let (mut inner, request) = take_pair(inner, request);
                    match read_step(ctx, loaded) {
                        ReadStep::Run(read) => State::Reading {
                            future: inner.call(request),
                            read: Some(read),
                        },
                        ReadStep::Answer(response) => State::Ready {
                            response: Some(response),
                        },
                    }
                }
                StateProj::Reading { future, read } => {
                    let result = ready!(future.poll(cx));
                    let ctx = this.ctx.take().expect("read context");
                    let read = read.take().expect("read state");
                    match result {
                        Ok(response) => finish_read(ctx, read, response),
                        Err(error) => match read_failed(read) {
                            // An error is no 2xx either: undo the seed, then fail.
                            Some(undo) => State::Finishing {
                                finish: Box::pin(async move {
                                    undo.await;
                                    Err(error)
                                }),
                            },
                            None => return Poll::Ready(Err(error)),
                        },
                    }
                }

                StateProj::Checking {
                    check,
                    request,
                    inner,
                } => match ready!(check.as_mut().poll(cx)) {
                    Ok(()) => {
                        let request = request.take().expect("request taken once");
                        admitted_write(this.ctx, inner, request)
                    }
                    Err(refusal) => State::Ready {
                        response: Some(Early::Refused(refusal).into_response()),
                    },
                },
                StateProj::Collecting { body, parts, inner } => {
                    let bytes = match ready!(body.poll(cx)) {
                        Ok(bytes) => bytes,
                        Err(refusal) => {
                            this.state.set(State::Ready {
                                response: Some(Problem::from(&refusal).into_response()),
                            });
                            continue;
                        }
                    };
                    let parts = parts.take().expect("request head taken once");
                    let request = Request::from_parts(parts, ReqBody::from_bytes(bytes));
                    reserve_write(this.ctx, inner, request, None)
                }
                StateProj::Reserving {
                    reserve,
                    request,
                    inner,
                    watch,
                } => match ready!(reserve.as_mut().poll(cx)) {
                    Ok(guard) => {
                        let request = request.take().expect("request taken once");
                        start_write(inner, request, guard, watch.take())
                    }
                    Err(problem) => State::Ready {
                        response: Some(problem.into_response()),
                    },
                },
                StateProj::Writing {
                    future,
                    mut deadline,
                    guard,
                } => {
                    let result = match future.poll(cx) {
                        Poll::Ready(result) => Some(result),
                        Poll::Pending => {
                            if deadline.is_none() {
                                // Judged by the store's clock, so that no host's clock
                                // can push the handler past its lease.
                                let at = guard.as_ref().expect("write guard").deadline();
                                deadline.set(Some(tokio::time::sleep_until(at)));
                            }
                            let expired = deadline
                                .as_mut()
                                .as_pin_mut()
                                .is_some_and(|deadline| deadline.poll(cx).is_ready());
                            if !expired {
                                return Poll::Pending;
                            }
                            None
                        }
                    };
                    let ctx = this.ctx.take().expect("write context");
                    let guard = guard.take().expect("write guard");
                    match result {
                        Some(result) => finish_write(ctx, guard, result),
                        None => {
                            // Dropping the handler's future (by leaving this state)
                            // cancels it; the outcome is unknown, so: a fresh version.
                            tracing::warn!(key = &*ctx.key, "handler missed its deadline (503)");
                            State::Finishing {
                                finish: Box::pin(timed_out(ctx, guard)),
                            }
                        }
                    }
                }
            };
            // A finished response is handed out as it is, not first moved into the
            // state (a copy of the whole state, on every request).
            if let State::Ready { response } = next {
                let response = response.expect("a ready state holds its response");
                this.state.set(State::Ready { response: None });
                return Poll::Ready(Ok(response));
            }
            this.state.set(next);
        }
    }
}

/// A write the application let through: its body is read in full first, unless it is
/// streamed. The lease is taken once the body is in hand: a client that stalls its
/// upload holds nothing that other writers wait for, and a body cut off mid-upload is
/// refused before anything changes.
// Inlined: it returns the whole state, which a call would copy once more.
#[inline(always)]
fn admitted_write<S, ReqBody, ResBody>(
    ctx: &mut Option<Ctx>,
    inner: &mut Option<S>,
    request: Request<ReqBody>,
) -> State<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: BufferableBody,
{
    let body_config = &ctx.as_ref().expect("write context").config.request_body;
    if body_config.is_streaming() {
        // Streamed: the handler reads it; a failure mid-read makes the outcome unknown,
        // whatever the handler answers.
        let flag = WatchFlag::default();
        let request = request.map(|body| ReqBody::watched(body, flag.clone()));
        return reserve_write(ctx, inner, request, Some(flag));
    }
    let (parts, body) = request.into_parts();
    State::Collecting {
        body: body_config.collect(&parts.headers, body),
        parts: Some(parts),
        inner: inner.take(),
    }
}

/// Reserves a write whose request is ready to run: at once while the store answers at
/// once, in a boxed future from the step where it stops.
// Inlined: it returns the whole state, which a call would copy once more.
#[inline(always)]
fn reserve_write<S, ReqBody, ResBody>(
    ctx_slot: &mut Option<Ctx>,
    inner: &mut Option<S>,
    request: Request<ReqBody>,
    watch: Option<WatchFlag>,
) -> State<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: BufferableBody,
{
    // The reserve takes the context over (the preconditions for good: nothing after it
    // reads them) and hands it back when it is done.
    let ctx = ctx_slot.take().expect("write context");
    let mut reserve = Reserve::new(ctx.config, ctx.key, ctx.method, ctx.pre);
    match reserve.run_now(ReserveStep::ReadClock) {
        ReserveStep::Done(result) => {
            let (config, key, method, reserved) = reserve.finish(result);
            *ctx_slot = Some(Ctx::of_write(config, key, method));
            match reserved {
                Ok(guard) => start_write(inner, request, guard, watch),
                Err(problem) => State::Ready {
                    response: Some(problem.into_response()),
                },
            }
        }
        step => {
            let (config, key, method) = reserve.shared_parts();
            *ctx_slot = Some(Ctx::of_write(config, key, method));
            State::Reserving {
                reserve: Box::pin(reserve.run(step)),
                request: Some(request),
                inner: inner.take(),
                watch,
            }
        }
    }
}

/// Runs the handler of a reserved write, under its deadline.
// Inlined: it returns the whole state, which a call would copy once more.
#[inline(always)]
fn start_write<S, ReqBody, ResBody>(
    inner: &mut Option<S>,
    mut request: Request<ReqBody>,
    mut guard: WriteGuard,
    watch: Option<WatchFlag>,
) -> State<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: BufferableBody,
{
    let mut inner = inner.take().expect("inner service taken once");
    guard.watch_body(watch);
    request.extensions_mut().insert(guard.reservation());
    guard.handler_started();
    State::Writing {
        future: inner.call(request),
        deadline: None,
        guard: Some(guard),
    }
}

pub(crate) fn take_pair<S, R>(inner: &mut Option<S>, request: &mut Option<R>) -> (S, R) {
    (
        inner.take().expect("inner service taken once"),
        request.take().expect("request taken once"),
    )
}

/// What a read does once its entry is loaded.
enum ReadStep<B> {
    /// Run the handler.
    Run(ReadState),
    /// Answer without running it (`304` / `412`).
    Answer(Response<ResponseBody<B>>),
}

/// Decides a read from the loaded entry: answer now (`304` / `412`), or run the handler.
fn read_step<B>(ctx: &Ctx, loaded: Result<ReadStart, StoreError>) -> ReadStep<B> {
    let key = &*ctx.key;
    let start = match loaded {
        Ok(start) => start,
        Err(error) => {
            tracing::warn!(key, %error, "version store failed; serving the read without validators");
            return ReadStep::Run(ReadState::StoreFailed);
        }
    };
    let Some(entry) = start.entry.filter(|e| e.version().is_some()) else {
        return ReadStep::Run(ReadState::Unversioned);
    };
    let version = entry.version().expect("filtered on a version");
    let decision = evaluate(&ctx.method, &ctx.pre, Some(version));
    // Answered before the application decides only when the layer already knew the
    // resource (not a version this read just seeded) and short-circuiting is on.
    if ctx.config.short_circuit_reads && start.seed.is_none() {
        match decision {
            Decision::Proceed => {}
            Decision::NotModified => {
                tracing::debug!(key, "not modified (304)");
                return ReadStep::Answer(not_modified(version, &ctx.pre));
            }
            Decision::PreconditionFailed => {
                tracing::info!(key, "precondition failed on a read (412)");
                let problem = Problem::precondition_failed(
                    entry.into_version(),
                    &ctx.pre,
                    ctx.config.validators_on_412,
                );
                return ReadStep::Answer(problem.into_response());
            }
        }
    }
    ReadStep::Run(ReadState::Versioned {
        entry,
        decision,
        seed: start.seed,
    })
}

fn finish_read<S, ReqBody, ResBody>(
    ctx: Ctx,
    read: ReadState,
    mut response: Response<ResBody>,
) -> State<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: BufferableBody,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    let ready = |response: Response<ResponseBody<ResBody>>| State::Ready {
        response: Some(response),
    };
    let success = response.status().is_success();
    if !success {
        // Validators describe 2xx and 304 responses only.
        remove_validators(response.headers_mut());
    }
    match read {
        // An If-Match the layer cannot check must not pass as if it held.
        ReadState::StoreFailed | ReadState::Unversioned if success => {
            ready(unverifiable(&ctx.pre, response))
        }
        ReadState::StoreFailed | ReadState::Unversioned => ready(response.map(ResponseBody::inner)),
        ReadState::Versioned {
            seed: Some(seed), ..
        } => State::Finishing {
            finish: Box::pin(async move {
                if !success {
                    seed.withdraw().await;
                    return Ok(response.map(ResponseBody::inner));
                }
                let handler_tag = strong_etag(response.headers(), &ctx.key);
                Ok(match seed.confirm(handler_tag).await {
                    Some(version) => {
                        let decision = evaluate(&ctx.method, &ctx.pre, Some(&version));
                        answer_read(&ctx, response, decision, version)
                    }
                    None => unverifiable(&ctx.pre, response),
                })
            }),
        },
        ReadState::Versioned { .. } if !success => ready(response.map(ResponseBody::inner)),
        ReadState::Versioned {
            entry, decision, ..
        } => {
            let version = entry.version().expect("a versioned read has a version");
            match strong_etag(response.headers(), &ctx.key) {
                Some(tag) if !tag.strong_eq(version.etag()) => {
                    if entry.write_lease().is_some() {
                        // A write is in flight: it will commit a version of its own.
                        return ready(unverifiable(&ctx.pre, response));
                    }
                    State::Finishing {
                        finish: Box::pin(async move {
                            let adopted =
                                protocol::adopt_handler_tag(&ctx.config, &ctx.key, &entry, tag)
                                    .await;
                            Ok(match adopted {
                                Some(version) => {
                                    let decision = evaluate(&ctx.method, &ctx.pre, Some(&version));
                                    answer_read(&ctx, response, decision, version)
                                }
                                None => unverifiable(&ctx.pre, response),
                            })
                        }),
                    }
                }
                _ => {
                    let version = entry
                        .into_version()
                        .expect("a versioned read has a version");
                    ready(answer_read(&ctx, response, decision, version))
                }
            }
        }
    }
}

/// What is left to do after a read whose handler failed: withdraw the version this
/// read was seeding, as after any answer that is not `2xx` (`None`: nothing).
fn read_failed(read: ReadState) -> Option<impl Future<Output = ()> + Send> {
    let ReadState::Versioned {
        seed: Some(seed), ..
    } = read
    else {
        return None;
    };
    // The seed withdraws itself if dropped, but in the background; withdrawing it here
    // means the error reaches the caller only once nothing of the read is left.
    Some(seed.withdraw())
}

/// The answer to a read whose handler gave a `2xx`, by the decision for `version`.
fn answer_read<B>(
    ctx: &Ctx,
    mut response: Response<B>,
    decision: Decision,
    version: Version,
) -> Response<ResponseBody<B>> {
    match decision {
        Decision::Proceed => {
            set_validators(response.headers_mut(), &version);
            response.map(ResponseBody::inner)
        }
        Decision::NotModified => {
            tracing::debug!(key = &*ctx.key, "not modified (304, handler ran)");
            into_not_modified(response, &version, &ctx.pre)
        }
        Decision::PreconditionFailed => {
            tracing::info!(
                key = &*ctx.key,
                "precondition failed on a read (412, handler ran)"
            );
            Problem::precondition_failed(Some(version), &ctx.pre, ctx.config.validators_on_412)
                .into_response()
        }
    }
}

/// A 2xx read the layer cannot label with a version: no validators, and an `If-Match`
/// naming tags cannot be confirmed, so it fails.
fn unverifiable<B>(pre: &Preconditions, mut response: Response<B>) -> Response<ResponseBody<B>> {
    if protocol::if_match_names_tags(pre) {
        return Problem::precondition_failed(None, pre, false).into_response();
    }
    remove_validators(response.headers_mut());
    response.map(ResponseBody::inner)
}

/// The handler's own strong `ETag`, if it set exactly one valid one.
pub(crate) fn strong_etag(headers: &HeaderMap, key: &str) -> Option<EntityTag> {
    let mut values = headers.get_all(header::ETAG).iter();
    let value = values.next()?;
    let tag = EntityTag::parse_bytes(value.as_bytes())
        .ok()
        .filter(|t| !t.is_weak());
    if tag.is_none() || values.next().is_some() {
        tracing::warn!(
            key,
            "handler ETag is not one strong entity tag; the layer generates one"
        );
        return None;
    }
    tag
}

/// How a write whose handler answered `result` settles.
fn settlement_of<B, E>(
    ctx: &Ctx,
    guard: &WriteGuard,
    result: &Result<Response<B>, E>,
) -> Settlement {
    match result {
        Err(_) => Settlement::Unknown,
        // The body failed while the handler read it (streamed): whatever it answered,
        // it may have written part of it.
        Ok(_) if guard.body_failed() => Settlement::Unknown,
        Ok(r) if r.status().is_success() && ctx.method == Method::DELETE => Settlement::Remove,
        Ok(r) if r.status().is_success() => Settlement::Commit(strong_etag(r.headers(), &ctx.key)),
        Ok(r) if r.status().is_client_error() => Settlement::Release,
        Ok(_) => Settlement::Unknown,
    }
}

/// Settles a write whose handler answered: at once when the store can (no future),
/// otherwise in a boxed future.
fn finish_write<S, ReqBody, ResBody>(
    ctx: Ctx,
    guard: WriteGuard,
    result: Result<Response<ResBody>, S::Error>,
) -> State<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: BufferableBody,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    let settlement = settlement_of(&ctx, &guard, &result);
    match guard.settle_now(settlement) {
        Ok(settled) => match respond_to_write(&ctx, settled, result) {
            Ok(response) => State::Ready {
                response: Some(response),
            },
            Err(error) => State::Finishing {
                finish: Box::pin(async move { Err(error) }),
            },
        },
        Err(pending) => State::Finishing {
            finish: Box::pin(async move {
                let settled = pending.finish().await;
                respond_to_write(&ctx, settled, result)
            }),
        },
    }
}

/// The response to a settled write.
fn respond_to_write<B, E>(
    ctx: &Ctx,
    settled: Settled,
    result: Result<Response<B>, E>,
) -> Output<B, E> {
    let mut response = result?;
    let success = response.status().is_success();
    match settled {
        // Validators go on 2xx only: a client that keeps the last ETag it saw must not
        // pick up one from a 5xx, whose write may not have happened as it asked.
        Settled::Applied(Some(version)) if success => {
            set_new_validators(response.headers_mut(), &version)
        }
        Settled::LeaseLost if success => {
            return Ok(Problem::lease_lost(ctx.config.retry_after).into_response());
        }
        _ => remove_validators(response.headers_mut()),
    }
    Ok(response.map(ResponseBody::inner))
}

async fn timed_out<B, E>(ctx: Ctx, guard: WriteGuard) -> Output<B, E> {
    guard.settle(Settlement::Unknown).await;
    Ok(Problem::handler_timeout(ctx.config.retry_after).into_response())
}
