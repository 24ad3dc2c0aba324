//! Routes, request parsing and the durability thread.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use facematch::compliance::{ConsentRecord, Operator, Purpose, SubjectId};
use facematch::engine::{self, Engine, Enrolment, Pending, QueryContext};
use facematch::image_io::{encode, OutputFormat};
use facematch::pipeline::FacePipeline;
use facematch::probe;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::metrics::{route_label, Metrics};
use crate::{ApiError, ServerConfig};

/// Header naming the declared purpose of a query or enrolment.
pub const PURPOSE_HEADER: &str = "x-facematch-purpose";
/// Header naming the operator when no tokens are configured.
pub const OPERATOR_HEADER: &str = "x-facematch-operator";

/// Work for the durability thread: wait for one answer's audit record.
type Job = Box<dyn FnOnce() + Send>;

/// The thread that waits for audit records to be durable, so that no request
/// holds a thread while its record is committed. Jobs run in submission order
/// (records commit in sequence order, so a later job rarely waits long).
pub(crate) fn durability_thread(capacity: usize) -> std::io::Result<(tokio::sync::mpsc::Sender<Job>, std::thread::JoinHandle<()>)> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Job>(capacity);
    let handle = std::thread::Builder::new().name("facematch-durable".into()).spawn(move || {
        while let Some(job) = rx.blocking_recv() {
            job();
        }
    })?;
    Ok((tx, handle))
}

/// What every handler shares.
pub(crate) struct AppState {
    engine: Arc<Engine>,
    pipeline: Option<Arc<FacePipeline>>,
    cfg: ServerConfig,
    /// CPU slots: at most `workers` requests compute at once.
    cpu: tokio::sync::Semaphore,
    jobs: tokio::sync::mpsc::Sender<Job>,
    pub(crate) metrics: Arc<Metrics>,
    /// Requests in progress per operator (entries leave at zero), for
    /// [`ServerConfig::per_operator_concurrency`].
    per_operator: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl AppState {
    pub(crate) fn new(
        engine: Arc<Engine>,
        pipeline: Option<Arc<FacePipeline>>,
        cfg: ServerConfig,
        jobs: tokio::sync::mpsc::Sender<Job>,
        metrics: Arc<Metrics>,
    ) -> Arc<AppState> {
        let cpu = tokio::sync::Semaphore::new(cfg.workers);
        Arc::new(AppState { engine, pipeline, cfg, cpu, jobs, metrics, per_operator: Default::default() })
    }

    /// The operator a request would be recorded under, if it names one (for
    /// the per-operator limit; the handler still checks the credentials).
    fn operator_key(&self, headers: &HeaderMap) -> Option<String> {
        if self.cfg.tokens.is_empty() {
            return header_str(headers, OPERATOR_HEADER).ok().flatten().map(str::to_owned);
        }
        let auth = header_str(headers, header::AUTHORIZATION.as_str()).ok().flatten()?;
        self.cfg.tokens.get(auth.strip_prefix("Bearer ")?.trim()).cloned()
    }

    /// Take one of `operator`'s request slots, or `None` when all are taken.
    fn operator_slot(self: &Arc<Self>, operator: String, limit: usize) -> Option<OperatorSlot> {
        let mut m = self.per_operator.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(operator.clone()).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(OperatorSlot { st: Arc::clone(self), operator })
    }

    /// Run `f` (engine or pipeline work) on a blocking thread once a CPU slot is free.
    async fn compute<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let _slot = self.cpu.acquire().await.map_err(|_| unavailable())?;
        let st = Arc::clone(self);
        tokio::task::spawn_blocking(move || f(&st)).await.map_err(|e| {
            tracing::error!(error = %e, "request handler failed");
            ApiError::new(500, "internal", "internal error (see the server log)")
        })?
    }

    /// Release `pending` once its audit record is durable.
    async fn durable<T: Send + 'static>(&self, pending: Pending<T>) -> Result<T, ApiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(pending.wait());
        });
        self.jobs.send(job).await.map_err(|_| unavailable())?;
        Ok(rx.await.map_err(|_| unavailable())??)
    }

    fn operator(&self, headers: &HeaderMap) -> Result<Operator, ApiError> {
        if self.cfg.tokens.is_empty() {
            let name =
                header_str(headers, OPERATOR_HEADER)?.ok_or_else(|| ApiError::bad_request(format!("missing {OPERATOR_HEADER} header")))?;
            return Ok(Operator::new(name)?);
        }
        let auth = header_str(headers, header::AUTHORIZATION.as_str())?.ok_or_else(ApiError::unauthorized)?;
        let token = auth.strip_prefix("Bearer ").ok_or_else(ApiError::unauthorized)?;
        let op = self.cfg.tokens.get(token.trim()).ok_or_else(ApiError::unauthorized)?;
        Ok(Operator::new(op.as_str())?)
    }

    fn context(&self, headers: &HeaderMap) -> Result<QueryContext, ApiError> {
        let operator = self.operator(headers)?;
        let purpose =
            header_str(headers, PURPOSE_HEADER)?.ok_or_else(|| ApiError::bad_request(format!("missing {PURPOSE_HEADER} header")))?;
        Ok(QueryContext::new(operator, Purpose::new(purpose)?))
    }

    fn pipeline(&self) -> Result<Arc<FacePipeline>, ApiError> {
        self.pipeline.clone().ok_or_else(|| {
            ApiError::new(415, "unsupported_media_type", "this server runs without the face models: send embeddings as JSON")
        })
    }

    fn k(&self, k: Option<usize>) -> Result<usize, ApiError> {
        let k = k.unwrap_or(self.cfg.default_k);
        if k == 0 || k > self.cfg.max_k {
            return Err(ApiError::bad_request(format!("k must be 1..={}", self.cfg.max_k)));
        }
        Ok(k)
    }
}

/// One request's slot under its operator's limit, given back when dropped.
struct OperatorSlot {
    st: Arc<AppState>,
    operator: String,
}

impl Drop for OperatorSlot {
    fn drop(&mut self) {
        let mut m = self.st.per_operator.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.operator) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.operator);
            }
        }
    }
}

/// Around every request: the per-operator limit, the body read within
/// `body_timeout` (408 and the connection closed otherwise), and the metrics
/// (route template, status, latency, requests in flight).
async fn admission(State(st): State<Arc<AppState>>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let start = std::time::Instant::now();
    let route = route_label(req.uri().path());
    st.metrics.in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let response = admit(&st, req, next).await;
    st.metrics.in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    st.metrics.record(route, response.status().as_u16(), start.elapsed());
    response
}

async fn admit(st: &Arc<AppState>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let _slot = match (st.cfg.per_operator_concurrency, st.operator_key(req.headers())) {
        (Some(limit), Some(op)) => match st.operator_slot(op, limit) {
            Some(slot) => Some(slot),
            None => {
                st.metrics.operator_limited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return close(
                    ApiError::new(429, "too_many_requests", format!("this operator already has {limit} requests in progress"))
                        .into_response(),
                );
            }
        },
        _ => None,
    };
    let limit = st.cfg.max_body_bytes;
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return close(ApiError::too_large(limit).into_response());
    }
    let (parts, body) = req.into_parts();
    let limited = http_body_util::Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    let bytes = match tokio::time::timeout(st.cfg.body_timeout, http_body_util::BodyExt::collect(limited)).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return close(ApiError::too_large(limit).into_response()),
        Ok(Err(_)) => return close(ApiError::bad_request("the request body could not be read").into_response()),
        Err(_) => {
            st.metrics.body_timeouts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return close(ApiError::new(408, "request_timeout", "the request body did not arrive in time").into_response());
        }
    };
    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// Ask for the connection to be closed after this response (its body may be unread).
fn close(mut r: Response) -> Response {
    r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn unavailable() -> ApiError {
    ApiError::new(503, "unavailable", "the server is shutting down")
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| ApiError::bad_request(format!("{name} is not visible ASCII"))),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], self.body()).into_response()
    }
}

/// The body of a request: JSON, or an encoded image.
enum Body {
    Json(Bytes),
    Image(Bytes),
}

fn body(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Body, ApiError> {
    let bytes = body.map_err(|r| match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(413, "payload_too_large", "request body too large"),
        s => ApiError::new(s.as_u16(), "bad_request", r.body_text()),
    })?;
    let ct = header_str(headers, header::CONTENT_TYPE.as_str())?.unwrap_or("").to_ascii_lowercase();
    if ct.starts_with("application/json") {
        Ok(Body::Json(bytes))
    } else if ct.starts_with("image/") || ct.starts_with("application/octet-stream") {
        Ok(Body::Image(bytes))
    } else {
        Err(ApiError::new(415, "unsupported_media_type", "send application/json, or an image as image/* or application/octet-stream"))
    }
}

/// Parse JSON without echoing any of it back (values may be biometric).
fn parse<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => "malformed JSON",
            _ => "JSON does not match the request's schema",
        };
        ApiError::bad_request(format!("{what} at line {} column {}", e.line(), e.column()))
    })
}

/// Parse a body that holds a probe (an embedding), then wipe it.
fn parse_probe<T: for<'de> Deserialize<'de>>(bytes: Bytes) -> Result<T, ApiError> {
    let r = parse(&bytes);
    wipe(bytes);
    r
}

/// The query string, or a 400 saying what is wrong with it.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v).map_err(|r| ApiError::bad_request(r.body_text()))
}

/// Wipe a request body that held a probe (best effort: `Bytes` may be shared).
fn wipe(bytes: Bytes) {
    if let Ok(mut m) = bytes.try_into_mut() {
        m.as_mut().zeroize();
    }
}

fn json<T: Serialize>(v: &T) -> Response {
    Json(v).into_response()
}

/// All routes.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let limit = usize::try_from(state.cfg.max_body_bytes).unwrap_or(usize::MAX);
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/stats", get(stats))
        .route("/v1/identify", post(identify))
        .route("/v1/verify", post(verify))
        .route("/v1/anonymise", post(anonymise))
        .route("/v1/consents", post(consent))
        .route("/v1/enrol", post(enrol))
        .route("/v1/subjects/{subject}/withdraw", post(withdraw))
        .fallback(|uri: axum::http::Uri| async move { ApiError::not_found(uri.path()) })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), admission))
        .with_state(state)
}

/// `GET /metrics` alone, without credentials: for a separate listen address.
pub(crate) fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(open_metrics))
        .fallback(|uri: axum::http::Uri| async move { ApiError::not_found(uri.path()) })
        .with_state(state)
}

fn render_metrics(st: &AppState) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"))], st.metrics.render(&st.engine))
        .into_response()
}

async fn metrics(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    if st.cfg.metrics_listen.is_some() {
        return Err(ApiError::not_found("/metrics"));
    }
    st.operator(&headers)?;
    Ok(render_metrics(&st))
}

async fn open_metrics(State(st): State<Arc<AppState>>) -> Response {
    render_metrics(&st)
}

/// Ready to answer: the gallery is open and its audit log takes records.
async fn ready(State(st): State<Arc<AppState>>) -> Response {
    match st.engine.audit_stats() {
        Ok(_) => json(&serde_json::json!({"status": "ready"})),
        Err(_) => ApiError::new(503, "not_ready", "the audit log is not open: queries cannot be answered").into_response(),
    }
}

async fn health() -> Response {
    json(&serde_json::json!({"status": "ok"}))
}

async fn stats(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    st.operator(&headers)?;
    let audit = st.engine.audit_stats()?;
    Ok(json(&serde_json::json!({
        "gallery": st.engine.stats(),
        "audit": audit,
        "notices": st.engine.notices(),
        "images": st.pipeline.is_some(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentifyJson {
    embedding: Vec<f32>,
    #[serde(default)]
    k: Option<usize>,
}

#[derive(Deserialize)]
struct KParam {
    k: Option<usize>,
}

async fn identify(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    q: Result<Query<KParam>, QueryRejection>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let ctx = st.context(&headers)?;
    let q = query(q)?;
    match body(&headers, raw)? {
        Body::Json(bytes) => {
            let mut req: IdentifyJson = parse_probe(bytes)?;
            let k = st.k(req.k.or(q.k))?;
            let pending = st
                .compute(move |st| {
                    let r = st.engine.query_deferred(&ctx, engine::Query::identify(&req.embedding, k));
                    req.embedding.zeroize();
                    Ok(r?)
                })
                .await?;
            Ok(json(&st.durable(pending).await?))
        }
        Body::Image(bytes) => {
            let k = st.k(q.k)?;
            let pipeline = st.pipeline()?;
            let r = st.compute(move |st| Ok(probe::identify_image(&st.engine, &pipeline, &ctx, &bytes, k)?)).await?;
            Ok(json(&r))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyJson {
    embedding: Vec<f32>,
    subject: String,
}

#[derive(Deserialize)]
struct SubjectParam {
    subject: Option<String>,
}

async fn verify(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    q: Result<Query<SubjectParam>, QueryRejection>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let ctx = st.context(&headers)?;
    let q = query(q)?;
    match body(&headers, raw)? {
        Body::Json(bytes) => {
            let mut req: VerifyJson = parse_probe(bytes)?;
            let subject = SubjectId::new(std::mem::take(&mut req.subject))?;
            let pending = st
                .compute(move |st| {
                    let r = st.engine.query_deferred(&ctx, engine::Query::verify(&req.embedding, &subject));
                    req.embedding.zeroize();
                    Ok(r?)
                })
                .await?;
            Ok(json(&st.durable(pending).await?))
        }
        Body::Image(bytes) => {
            let subject = SubjectId::new(q.subject.ok_or_else(|| ApiError::bad_request("an image verification needs ?subject="))?)?;
            let pipeline = st.pipeline()?;
            let r = st.compute(move |st| Ok(probe::verify_image(&st.engine, &pipeline, &ctx, &bytes, &subject)?)).await?;
            Ok(json(&r))
        }
    }
}

async fn anonymise(State(st): State<Arc<AppState>>, headers: HeaderMap, raw: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    st.operator(&headers)?;
    let Body::Image(bytes) = body(&headers, raw)? else {
        return Err(ApiError::new(415, "unsupported_media_type", "send the image as image/* or application/octet-stream"));
    };
    let pipeline = st.pipeline()?;
    let (png, faces) = st
        .compute(move |st| {
            let (img, boxes) = probe::anonymise_image(&pipeline, &bytes, &st.cfg.anonymise)?;
            Ok((encode(&img, OutputFormat::Png)?, boxes.len()))
        })
        .await?;
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("image/png")),
            (header::HeaderName::from_static("x-facematch-faces"), HeaderValue::from(faces)),
        ],
        png,
    )
        .into_response())
}

async fn consent(State(st): State<Arc<AppState>>, headers: HeaderMap, raw: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let op = st.operator(&headers)?;
    let Body::Json(bytes) = body(&headers, raw)? else {
        return Err(ApiError::new(415, "unsupported_media_type", "send the consent record as application/json"));
    };
    let record: ConsentRecord = parse(&bytes)?;
    let id = record.consent_id.clone();
    st.compute(move |st| Ok(st.engine.record_consent(&op, record)?)).await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({"consent_id": id}))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrolJson {
    subject: String,
    consent_id: String,
    purposes: Vec<String>,
    embedding: Vec<f32>,
    #[serde(default)]
    template: Option<u64>,
}

#[derive(Deserialize)]
struct EnrolParams {
    subject: Option<String>,
    consent_id: Option<String>,
    purposes: Option<String>,
}

fn purposes<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Result<Vec<Purpose>, ApiError> {
    let v = names
        .into_iter()
        .filter(|s| !s.as_ref().trim().is_empty())
        .map(|s| Purpose::new(s.as_ref().trim()).map_err(ApiError::from))
        .collect::<Result<Vec<_>, _>>()?;
    if v.is_empty() {
        return Err(ApiError::bad_request("an enrolment needs at least one purpose"));
    }
    Ok(v)
}

async fn enrol(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    q: Result<Query<EnrolParams>, QueryRejection>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let op = st.operator(&headers)?;
    let q = query(q)?;
    match body(&headers, raw)? {
        Body::Json(bytes) => {
            let mut req: EnrolJson = parse_probe(bytes)?;
            let mut e = Enrolment::new(
                SubjectId::new(std::mem::take(&mut req.subject))?,
                std::mem::take(&mut req.consent_id),
                purposes(&req.purposes)?,
                std::mem::take(&mut req.embedding),
            );
            e.template = req.template;
            let template = st
                .compute(move |st| {
                    let r = st.engine.enrol(&op, e.clone());
                    e.embedding.zeroize();
                    Ok(r?)
                })
                .await?;
            Ok((StatusCode::CREATED, Json(serde_json::json!({"template": template}))).into_response())
        }
        Body::Image(bytes) => {
            let need = |v: Option<String>, name: &str| v.ok_or_else(|| ApiError::bad_request(format!("an image enrolment needs ?{name}=")));
            let subject = SubjectId::new(need(q.subject, "subject")?)?;
            let consent_id = need(q.consent_id, "consent_id")?;
            let purposes = purposes(need(q.purposes, "purposes")?.split(','))?;
            let pipeline = st.pipeline()?;
            let (template, face, discarded) = st
                .compute(move |st| {
                    Ok(probe::enrol_image(&st.engine, &pipeline, &op, &bytes, Enrolment::new(subject, consent_id, purposes, Vec::new()))?)
                })
                .await?;
            Ok((StatusCode::CREATED, Json(serde_json::json!({"template": template, "face": face, "faces_discarded": discarded})))
                .into_response())
        }
    }
}

async fn withdraw(State(st): State<Arc<AppState>>, headers: HeaderMap, Path(subject): Path<String>) -> Result<Response, ApiError> {
    let op = st.operator(&headers)?;
    let subject = SubjectId::new(subject)?;
    let report = st.compute(move |st| Ok(st.engine.withdraw(&op, &subject)?)).await?;
    Ok(json(&report))
}
