//! Factor rows between workers over Arrow Flight.
//!
//! Every worker publishes, per job, the key lists of its shards (after loading;
//! with the ids' text for item shards) and the current factors of the shards it
//! owns (after each ALS half-step) on its [`Shelf`]; its Flight service answers
//! `DoGet` with a prost-encoded [`pb::FactorTicket`]: a shard's keys (one UInt64
//! column `key`), its ids (one Utf8 column `id`) or the rows asked for of one
//! version of its factors (one `FixedSizeList<Float32>` column `factors`).
//! The shelf is separate from the job's state, so serving never waits for a step
//! that is running on the same worker.

use crate::WorkerError;
use crate::steps::als::Side;
use arrow::array::{Array, ArrayRef, FixedSizeListArray, Float32Array, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use shoal_net::auth::{AuthChannel, WithToken};
use shoal_net::tls;
use shoal_proto::{MAX_MESSAGE_BYTES, pb};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::{Request, Response, Status, Streaming};

/// Longest a fetch from another worker may take.
const PEER_TIMEOUT: Duration = Duration::from_secs(600);

/// What a worker publishes of one shard of one side.
#[derive(Debug, Clone)]
pub struct Shelved {
    /// By position.
    pub keys: Arc<Vec<u64>>,
    /// The ids' text by position (item shards: for the catalogue).
    pub ids: Option<StringArray>,
    /// Version (half-steps of the side applied) and row-major factors; `None`
    /// before the job's ALS is linked.
    pub factors: Option<(u32, usize, Arc<Vec<f32>>)>,
}

type ShelfKey = (String, Side, u32);

/// The id lists and factors this worker serves, per (job, side, shard).
#[derive(Debug, Clone, Default)]
pub struct Shelf(Arc<Mutex<HashMap<ShelfKey, Shelved>>>);

impl Shelf {
    pub fn put_keys(
        &self,
        job: &str,
        side: Side,
        shard: u32,
        keys: Arc<Vec<u64>>,
        ids: Option<StringArray>,
    ) {
        self.0.lock().expect("shelf lock").insert(
            (job.to_string(), side, shard),
            Shelved {
                keys,
                ids,
                factors: None,
            },
        );
    }

    /// Publishes `version` of a shard's factors (its keys must be on the shelf,
    /// as `keys`: the shelf's own list, published by the same load), shared with
    /// whoever else holds them (the backend's own copy, on the CPU). The factors
    /// of a load a later attempt superseded are refused.
    #[allow(clippy::too_many_arguments)]
    pub fn put_factors(
        &self,
        job: &str,
        side: Side,
        shard: u32,
        keys: &Arc<Vec<u64>>,
        version: u32,
        f: usize,
        values: impl Into<Arc<Vec<f32>>>,
    ) -> Result<(), WorkerError> {
        let values = values.into();
        let mut shelf = self.0.lock().expect("shelf lock");
        let entry = shelf
            .get_mut(&(job.to_string(), side, shard))
            .ok_or_else(|| WorkerError::UnknownShard {
                job: job.to_string(),
                shard,
            })?;
        if !Arc::ptr_eq(&entry.keys, keys) {
            return Err(WorkerError::Inconsistent {
                job: job.to_string(),
                detail: format!(
                    "{} shard {shard}: factors of a load a later attempt replaced; not published",
                    side.as_str()
                ),
            });
        }
        if values.len() != entry.keys.len() * f {
            return Err(WorkerError::Inconsistent {
                job: job.to_string(),
                detail: format!(
                    "{} factor values for the {} {} of shard {shard} with {f} factors",
                    values.len(),
                    entry.keys.len(),
                    side.as_str()
                ),
            });
        }
        entry.factors = Some((version, f, values));
        Ok(())
    }

    /// Stops serving a shard's factors (before they are solved again in place: no
    /// one reads this side while its own half-step runs).
    pub fn retire_factors(&self, job: &str, side: Side, shard: u32) {
        if let Some(entry) =
            self.0
                .lock()
                .expect("shelf lock")
                .get_mut(&(job.to_string(), side, shard))
        {
            entry.factors = None;
        }
    }

    pub fn get(&self, job: &str, side: Side, shard: u32) -> Option<Shelved> {
        self.0
            .lock()
            .expect("shelf lock")
            .get(&(job.to_string(), side, shard))
            .cloned()
    }

    /// Forgets everything of `job`.
    pub fn drop_job(&self, job: &str) {
        self.0.lock().expect("shelf lock").retain(|k, _| k.0 != job);
    }

    /// Answers a ticket from the shelf.
    pub fn answer(&self, t: &pb::FactorTicket) -> Result<Answer, WorkerError> {
        let side = Side::from_proto(t.side)?;
        let what = format!("{} shard {} of job {}", side.as_str(), t.shard, t.job_id);
        let shelved =
            self.get(&t.job_id, side, t.shard)
                .ok_or_else(|| WorkerError::UnknownShard {
                    job: t.job_id.clone(),
                    shard: t.shard,
                })?;
        if t.keys {
            return Ok(Answer::Keys(shelved.keys));
        }
        if t.ids {
            return match shelved.ids {
                Some(ids) => Ok(Answer::Ids(ids)),
                None => Err(WorkerError::InvalidRequest(format!(
                    "{what}: its ids are not served (only item shards' are)"
                ))),
            };
        }
        let (version, f, values) = shelved.factors.ok_or(WorkerError::StaleFactors {
            what: what.clone(),
            have: 0,
            wanted: t.version,
        })?;
        if version != t.version {
            return Err(WorkerError::StaleFactors {
                what,
                have: version,
                wanted: t.version,
            });
        }
        let n = shelved.keys.len();
        if !t.rows.is_empty() && !t.runs.is_empty() {
            return Err(WorkerError::InvalidRequest(format!(
                "a ticket for {what} lists both rows and runs"
            )));
        }
        if !t.runs.len().is_multiple_of(2) {
            return Err(WorkerError::InvalidRequest(format!(
                "a ticket for {what} has {} run values: runs come as (first, count) pairs",
                t.runs.len()
            )));
        }
        if t.rows.is_empty() && t.runs.is_empty() {
            return Ok(Answer::Rows {
                f,
                values: values.as_ref().clone(),
            });
        }
        let runs: Vec<(usize, usize)> = if t.runs.is_empty() {
            t.rows.iter().map(|&r| (r as usize, 1)).collect()
        } else {
            t.runs
                .chunks_exact(2)
                .map(|p| (p[0] as usize, p[1] as usize))
                .collect()
        };
        let wanted: usize = runs.iter().map(|r| r.1).sum();
        let mut out = Vec::with_capacity(wanted * f);
        for (first, count) in runs {
            if first + count > n {
                return Err(WorkerError::InvalidRequest(format!(
                    "rows {first}..{} of {what}, which has {n} rows",
                    first + count
                )));
            }
            out.extend_from_slice(&values[first * f..(first + count) * f]);
        }
        Ok(Answer::Rows { f, values: out })
    }
}

/// `rows` for a ticket: as they are (`rows`), or as (first, count) pairs of
/// consecutive rows (`runs`), whichever is shorter; the other is empty. Empty
/// `rows` (every row) stay empty.
pub fn ticket_rows(rows: Vec<u32>) -> (Vec<u32>, Vec<u32>) {
    let mut runs: Vec<u32> = Vec::new();
    for &r in &rows {
        match runs.len() {
            len if len >= 2 && runs[len - 2].checked_add(runs[len - 1]) == Some(r) => {
                runs[len - 1] += 1;
            }
            _ => runs.extend([r, 1]),
        }
        if runs.len() >= rows.len() {
            // no shorter than the list itself
            return (rows, Vec::new());
        }
    }
    if runs.is_empty() {
        (rows, Vec::new())
    } else {
        (Vec::new(), runs)
    }
}

/// What a ticket gets.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Keys(Arc<Vec<u64>>),
    Ids(StringArray),
    Rows { f: usize, values: Vec<f32> },
}

impl Answer {
    fn into_batch(self) -> Result<RecordBatch, WorkerError> {
        let arrow = |e: arrow::error::ArrowError| WorkerError::Arrow {
            file: "(flight answer)".into(),
            source: e,
        };
        match self {
            Answer::Keys(keys) => {
                let col: ArrayRef = Arc::new(UInt64Array::from(keys.as_ref().clone()));
                RecordBatch::try_new(
                    Arc::new(Schema::new(vec![Field::new(
                        "key",
                        DataType::UInt64,
                        false,
                    )])),
                    vec![col],
                )
                .map_err(arrow)
            }
            Answer::Ids(ids) => {
                let col: ArrayRef = Arc::new(ids);
                RecordBatch::try_new(
                    Arc::new(Schema::new(vec![Field::new("id", DataType::Utf8, false)])),
                    vec![col],
                )
                .map_err(arrow)
            }
            Answer::Rows { f, values } => {
                let item = Arc::new(Field::new("item", DataType::Float32, false));
                let list = FixedSizeListArray::try_new(
                    item.clone(),
                    f as i32,
                    Arc::new(Float32Array::from(values)),
                    None,
                )
                .map_err(arrow)?;
                RecordBatch::try_new(
                    Arc::new(Schema::new(vec![Field::new(
                        "factors",
                        DataType::FixedSizeList(item, f as i32),
                        false,
                    )])),
                    vec![Arc::new(list)],
                )
                .map_err(arrow)
            }
        }
    }

    fn from_batches(batches: &[RecordBatch], want: Want) -> Result<Answer, String> {
        match want {
            Want::Keys => {
                let mut out = Vec::new();
                for b in batches {
                    let col = b
                        .column_by_name("key")
                        .and_then(|c| c.as_any().downcast_ref::<UInt64Array>())
                        .ok_or("answer lacks the UInt64 column `key`")?;
                    out.extend_from_slice(col.values());
                }
                return Ok(Answer::Keys(Arc::new(out)));
            }
            Want::Ids => {
                let cols: Vec<&dyn Array> = batches
                    .iter()
                    .map(|b| {
                        b.column_by_name("id")
                            .filter(|c| c.data_type() == &DataType::Utf8)
                            .map(|c| c.as_ref())
                            .ok_or("answer lacks the Utf8 column `id`")
                    })
                    .collect::<Result<_, _>>()?;
                if cols.is_empty() {
                    return Ok(Answer::Ids(StringArray::from(Vec::<&str>::new())));
                }
                let all = arrow::compute::concat(&cols).map_err(|e| e.to_string())?;
                let ids = all
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .ok_or("ids are not Utf8")?
                    .clone();
                return Ok(Answer::Ids(ids));
            }
            Want::Rows => {}
        }
        let mut f = 0usize;
        let mut values = Vec::new();
        for b in batches {
            let col = b
                .column_by_name("factors")
                .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>())
                .ok_or("answer lacks the FixedSizeList column `factors`")?;
            f = col.value_length() as usize;
            let flat = col
                .values()
                .as_any()
                .downcast_ref::<Float32Array>()
                .ok_or("factors are not Float32")?;
            values.extend_from_slice(&flat.values()[..col.len() * f]);
        }
        Ok(Answer::Rows { f, values })
    }
}

/// What a ticket asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Keys,
    Ids,
    Rows,
}

impl Want {
    fn of(t: &pb::FactorTicket) -> Want {
        if t.keys {
            Want::Keys
        } else if t.ids {
            Want::Ids
        } else {
            Want::Rows
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Want::Keys => "keys",
            Want::Ids => "ids",
            Want::Rows => "factors",
        }
    }
}

/// The worker's Arrow Flight service: `DoGet` of [`pb::FactorTicket`]s.
#[derive(Clone)]
pub struct FactorService {
    shelf: Shelf,
}

impl FactorService {
    pub fn new(shelf: Shelf) -> FactorService {
        FactorService { shelf }
    }
}

fn unimplemented<T>(what: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!(
        "{what}: a shoal worker's Flight service answers DoGet of factor tickets only"
    )))
}

#[tonic::async_trait]
impl FlightService for FactorService {
    type HandshakeStream = BoxStream<'static, Result<HandshakeResponse, Status>>;
    type ListFlightsStream = BoxStream<'static, Result<FlightInfo, Status>>;
    type DoGetStream = BoxStream<'static, Result<FlightData, Status>>;
    type DoPutStream = BoxStream<'static, Result<PutResult, Status>>;
    type DoExchangeStream = BoxStream<'static, Result<FlightData, Status>>;
    type DoActionStream = BoxStream<'static, Result<arrow_flight::Result, Status>>;
    type ListActionsStream = BoxStream<'static, Result<ActionType, Status>>;

    async fn do_get(&self, req: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        let ticket = pb::FactorTicket::decode(req.into_inner().ticket)
            .map_err(|e| Status::invalid_argument(format!("not a shoal factor ticket: {e}")))?;
        let batch = self.shelf.answer(&ticket)?.into_batch()?;
        let stream = FlightDataEncoderBuilder::new()
            .build(futures::stream::once(async move { Ok(batch) }))
            .map_err(|e| Status::internal(e.to_string()));
        Ok(Response::new(stream.boxed()))
    }

    async fn handshake(
        &self,
        _: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        unimplemented("Handshake")
    }
    async fn list_flights(
        &self,
        _: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        unimplemented("ListFlights")
    }
    async fn get_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        unimplemented("GetFlightInfo")
    }
    async fn poll_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        unimplemented("PollFlightInfo")
    }
    async fn get_schema(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        unimplemented("GetSchema")
    }
    async fn do_put(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        unimplemented("DoPut")
    }
    async fn do_exchange(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        unimplemented("DoExchange")
    }
    async fn do_action(
        &self,
        _: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        unimplemented("DoAction")
    }
    async fn list_actions(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        unimplemented("ListActions")
    }
}

/// Fetches from other workers' Flight services (and from this worker's own shelf
/// when it owns the shard), with the workers' token and CA.
#[derive(Clone)]
pub struct Peers {
    shelf: Shelf,
    token: WithToken,
    ca: Option<PathBuf>,
    clients: Arc<Mutex<HashMap<String, FlightServiceClient<AuthChannel>>>>,
}

impl Peers {
    pub fn new(shelf: Shelf, token: WithToken, ca: Option<PathBuf>) -> Peers {
        Peers {
            shelf,
            token,
            ca,
            clients: Arc::default(),
        }
    }

    fn client(&self, address: &str) -> Result<FlightServiceClient<AuthChannel>, WorkerError> {
        let mut clients = self.clients.lock().expect("peer clients lock");
        if let Some(c) = clients.get(address) {
            return Ok(c.clone());
        }
        let channel = tls::endpoint(address, self.ca.as_deref())?
            .connect_timeout(Duration::from_secs(10))
            // a peer that stops answering fails the step instead of holding it
            .timeout(PEER_TIMEOUT)
            .connect_lazy();
        let client = FlightServiceClient::with_interceptor(channel, self.token.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        clients.insert(address.to_string(), client.clone());
        Ok(client)
    }

    /// Answers `ticket`, from the local shelf when this worker holds the shard,
    /// else from `owner` over Flight.
    pub async fn fetch(
        &self,
        owner: &str,
        ticket: pb::FactorTicket,
    ) -> Result<Answer, WorkerError> {
        let side = Side::from_proto(ticket.side)?;
        if self.shelf.get(&ticket.job_id, side, ticket.shard).is_some() {
            return self.shelf.answer(&ticket);
        }
        let want = Want::of(&ticket);
        let what = format!(
            "{} of {} shard {}",
            want.as_str(),
            side.as_str(),
            ticket.shard
        );
        let peer = |message: String| WorkerError::Peer {
            address: owner.to_string(),
            what: what.clone(),
            message: format!(
                "{message} (workers fetch factor rows from each other's gRPC port: can this worker reach that one?)"
            ),
        };
        let mut client = arrow_flight::FlightClient::new_from_inner(self.client(owner)?);
        let stream = client
            .do_get(Ticket {
                ticket: ticket.encode_to_vec().into(),
            })
            .await
            .map_err(|e| peer(e.to_string()))?;
        let batches: Vec<RecordBatch> = stream
            .try_collect()
            .await
            .map_err(|e| peer(e.to_string()))?;
        Answer::from_batches(&batches, want).map_err(|m| peer(m.to_string()))
    }

    /// The key list of `side`'s shard `shard` of `job`, from `owner`.
    pub async fn fetch_keys(
        &self,
        owner: &str,
        job: &str,
        side: Side,
        shard: u32,
    ) -> Result<Arc<Vec<u64>>, WorkerError> {
        match self
            .fetch(owner, list_ticket(job, side, shard, Want::Keys))
            .await?
        {
            Answer::Keys(keys) => Ok(keys),
            _ => Err(wrong_answer(owner, "keys", side, shard)),
        }
    }

    /// The ids (text) of `side`'s shard `shard` of `job`, from `owner`.
    pub async fn fetch_ids(
        &self,
        owner: &str,
        job: &str,
        side: Side,
        shard: u32,
    ) -> Result<StringArray, WorkerError> {
        match self
            .fetch(owner, list_ticket(job, side, shard, Want::Ids))
            .await?
        {
            Answer::Ids(ids) => Ok(ids),
            _ => Err(wrong_answer(owner, "ids", side, shard)),
        }
    }

    /// Rows `rows` (every row when empty) of version `version` of the factors of
    /// `side`'s shard `shard` of `job`, from `owner`: row-major values.
    pub async fn fetch_rows(
        &self,
        owner: &str,
        job: &str,
        (side, shard): (Side, u32),
        version: u32,
        rows: Vec<u32>,
    ) -> Result<Vec<f32>, WorkerError> {
        let (rows, runs) = ticket_rows(rows);
        let ticket = pb::FactorTicket {
            job_id: job.to_string(),
            side: side.to_proto(),
            shard,
            version,
            ids: false,
            rows,
            runs,
            keys: false,
        };
        match self.fetch(owner, ticket).await? {
            Answer::Rows { values, .. } => Ok(values),
            _ => Err(wrong_answer(owner, "factors", side, shard)),
        }
    }
}

/// A ticket for a shard's key list or ids.
fn list_ticket(job: &str, side: Side, shard: u32, want: Want) -> pb::FactorTicket {
    pb::FactorTicket {
        job_id: job.to_string(),
        side: side.to_proto(),
        shard,
        version: 0,
        ids: want == Want::Ids,
        rows: Vec::new(),
        runs: Vec::new(),
        keys: want == Want::Keys,
    }
}

/// A peer answered ids for factors or factors for ids.
fn wrong_answer(owner: &str, wanted: &str, side: Side, shard: u32) -> WorkerError {
    WorkerError::Peer {
        address: owner.to_string(),
        what: format!("{wanted} of {} shard {shard}", side.as_str()),
        message: "answered another kind of data".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(side: Side, shard: u32, version: u32, rows: Vec<u32>) -> pb::FactorTicket {
        pb::FactorTicket {
            job_id: "j".into(),
            side: side.to_proto(),
            shard,
            version,
            ids: false,
            rows,
            runs: Vec::new(),
            keys: false,
        }
    }

    #[test]
    fn tickets_carry_the_shorter_of_rows_and_runs() {
        assert_eq!(ticket_rows(vec![]), (vec![], vec![]));
        assert_eq!(ticket_rows(vec![7]), (vec![7], vec![]));
        assert_eq!(ticket_rows(vec![3, 9, 4]), (vec![3, 9, 4], vec![]));
        assert_eq!(ticket_rows(vec![0, 1, 2, 3]), (vec![], vec![0, 4]));
        assert_eq!(
            ticket_rows(vec![5, 6, 7, 8, 20, 21, 2]),
            (vec![], vec![5, 4, 20, 2, 2, 1])
        );
        // as long as the list: the list
        assert_eq!(
            ticket_rows(vec![5, 6, 7, 20, 21, 2]),
            (vec![5, 6, 7, 20, 21, 2], vec![])
        );
        assert_eq!(
            ticket_rows(vec![u32::MAX, 0, 1]),
            (vec![u32::MAX, 0, 1], vec![])
        );
        let many: Vec<u32> = (100..1_000_100).collect();
        assert_eq!(ticket_rows(many), (vec![], vec![100, 1_000_000]));
    }

    #[test]
    fn shelf_answers_runs_like_the_rows_they_stand_for() {
        let shelf = Shelf::default();
        let keys = Arc::new((0..6).collect());
        shelf.put_keys("j", Side::Users, 0, Arc::clone(&keys), None);
        let values: Vec<f32> = (0..12).map(|v| v as f32).collect();
        shelf
            .put_factors("j", Side::Users, 0, &keys, 3, 2, values)
            .unwrap();
        for rows in [vec![1, 2, 3, 5, 0], vec![4, 5], vec![2]] {
            let (listed, runs) = ticket_rows(rows.clone());
            let mut t = ticket(Side::Users, 0, 3, listed);
            t.runs = runs;
            assert_eq!(
                shelf.answer(&t).unwrap(),
                shelf.answer(&ticket(Side::Users, 0, 3, rows)).unwrap()
            );
        }
        let mut t = ticket(Side::Users, 0, 3, vec![]);
        t.runs = vec![4, 3];
        let err = shelf.answer(&t).unwrap_err();
        assert!(err.to_string().contains("rows 4..7"), "{err}");
        t.runs = vec![4];
        assert!(shelf.answer(&t).unwrap_err().to_string().contains("pairs"));
        t.rows = vec![1];
        t.runs = vec![0, 1];
        assert!(shelf.answer(&t).unwrap_err().to_string().contains("both"));
    }

    #[test]
    fn shelf_answers_rows_in_the_order_asked_and_refuses_other_versions() {
        let shelf = Shelf::default();
        let ids = StringArray::from(vec!["a", "b", "c"]);
        let keys = Arc::new(vec![10, 20, 30]);
        shelf.put_keys("j", Side::Items, 2, keys.clone(), Some(ids.clone()));
        let early = shelf
            .answer(&ticket(Side::Items, 2, 0, vec![]))
            .unwrap_err();
        assert!(matches!(early, WorkerError::StaleFactors { .. }), "{early}");
        shelf
            .put_factors(
                "j",
                Side::Items,
                2,
                &keys,
                1,
                2,
                vec![0., 1., 10., 11., 20., 21.],
            )
            .unwrap();
        assert_eq!(
            shelf
                .answer(&ticket(Side::Items, 2, 1, vec![2, 0]))
                .unwrap(),
            Answer::Rows {
                f: 2,
                values: vec![20., 21., 0., 1.]
            }
        );
        let stale = shelf
            .answer(&ticket(Side::Items, 2, 0, vec![]))
            .unwrap_err();
        assert!(stale.to_string().contains("version 1"), "{stale}");
        assert!(shelf.answer(&ticket(Side::Items, 2, 1, vec![3])).is_err());
        assert!(shelf.answer(&ticket(Side::Users, 2, 1, vec![])).is_err());
        let mut t = ticket(Side::Items, 2, 9, vec![]);
        t.ids = true;
        assert_eq!(shelf.answer(&t).unwrap(), Answer::Ids(ids));
        t.ids = false;
        t.keys = true;
        assert_eq!(shelf.answer(&t).unwrap(), Answer::Keys(keys.clone()));
        assert!(
            shelf
                .put_factors("j", Side::Items, 2, &keys, 2, 2, vec![0.0; 5])
                .is_err()
        );
        // a list of the same keys, but not the one on the shelf: another load's
        assert!(
            shelf
                .put_factors(
                    "j",
                    Side::Items,
                    2,
                    &Arc::new(vec![10, 20, 30]),
                    2,
                    2,
                    vec![0.0; 6]
                )
                .is_err()
        );
        shelf.drop_job("j");
        assert!(shelf.get("j", Side::Items, 2).is_none());
    }

    #[test]
    fn answers_survive_the_arrow_round_trip() {
        let rows = Answer::Rows {
            f: 3,
            values: (0..12).map(|v| v as f32).collect(),
        };
        let batch = rows.clone().into_batch().unwrap();
        assert_eq!(
            Answer::from_batches(&[batch.slice(0, 2), batch.slice(2, 2)], Want::Rows).unwrap(),
            rows
        );
        let ids = Answer::Ids(StringArray::from(vec!["x", "y", "z"]));
        let batch = ids.clone().into_batch().unwrap();
        assert_eq!(
            Answer::from_batches(&[batch.slice(0, 1), batch.slice(1, 2)], Want::Ids).unwrap(),
            ids
        );
        let keys = Answer::Keys(Arc::new(vec![3, 1, 2]));
        let batch = keys.clone().into_batch().unwrap();
        assert_eq!(Answer::from_batches(&[batch], Want::Keys).unwrap(), keys);
    }
}
