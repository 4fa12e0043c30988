//! [`RunningHubClient`]: a typed client of the RunningHub OpenAPI.
//!
//! Every call has its own timeout. A call answers either a [`Verdict`] (RunningHub spoke: the
//! envelope was classified by [`crate::classify::classify`]) or a [`TransportError`] (timeout,
//! connection failure, HTTP 5xx, a body that is not a JSON envelope): transport errors are
//! transient by definition and callers retry them.
//!
//! The API key is a [`SecretString`]: it is sent in the JSON body (`apiKey`) and as a bearer
//! token, and appears in no `Debug` output, log line or error message.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::AUTHORIZATION;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use url::Url;

use crate::classify::{Endpoint, Envelope, Verdict, classify};

/// A failure to get an answer from RunningHub at all: always transient.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("RunningHub {endpoint}: {message}")]
pub struct TransportError {
    /// The endpoint's path.
    pub endpoint: &'static str,
    /// What went wrong (never contains the API key).
    pub message: String,
    /// It was a timeout of the call.
    pub timeout: bool,
}

/// The answer of one call: the envelope as received and its classification.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The envelope.
    pub envelope: Envelope,
    /// What it means.
    pub verdict: Verdict,
}

/// Settings of a [`RunningHubClient`].
#[derive(Clone)]
pub struct ClientConfig {
    /// `https://www.runninghub.cn` (or `https://www.runninghub.ai`, or a simulator).
    pub base_url: Url,
    /// The API key.
    pub api_key: SecretString,
    /// `instanceType` sent with create/run (e.g. `"plus"`); `None`: RunningHub's default.
    pub instance_type: Option<String>,
    /// `usePersonalQueue` sent with create.
    pub use_personal_queue: bool,
    /// Timeout of every JSON call (default 10 s).
    pub call_timeout: Duration,
    /// Timeout of an upload (default 120 s).
    pub upload_timeout: Duration,
    /// Longest stall while downloading an output (default 30 s).
    pub download_stall_timeout: Duration,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("base_url", &self.base_url.as_str())
            .field("api_key", &"[redacted]")
            .field("instance_type", &self.instance_type)
            .field("use_personal_queue", &self.use_personal_queue)
            .field("call_timeout", &self.call_timeout)
            .field("upload_timeout", &self.upload_timeout)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    /// Defaults for `base_url` and `api_key`.
    pub fn new(base_url: Url, api_key: SecretString) -> Self {
        ClientConfig {
            base_url,
            api_key,
            instance_type: None,
            use_personal_queue: false,
            call_timeout: Duration::from_secs(10),
            upload_timeout: Duration::from_secs(120),
            download_stall_timeout: Duration::from_secs(30),
        }
    }
}

/// One `nodeInfoList` entry: a widget value to set in a hosted workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// The node id.
    pub node_id: String,
    /// The input name.
    pub field_name: String,
    /// The value.
    pub field_value: Value,
}

/// What to create.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskRequest {
    /// A workflow hosted on RunningHub, by id, with widget values to set.
    Hosted {
        /// `workflowId`.
        workflow_id: String,
        /// `nodeInfoList`.
        node_info_list: Vec<NodeInfo>,
    },
    /// A full API-format workflow, sent as a JSON string in `workflow` (RunningHub still wants a
    /// `workflowId` of the account: the graph replaces its content).
    Full {
        /// `workflowId`.
        workflow_id: String,
        /// The API-format graph.
        workflow: Value,
    },
    /// An AI app (`/task/openapi/ai-app/run`).
    AiApp {
        /// `webappId`.
        webapp_id: String,
        /// `nodeInfoList`.
        node_info_list: Vec<NodeInfo>,
    },
}

/// `data` of a successful create.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CreatedTask {
    /// `taskId`.
    pub task_id: String,
    /// `taskStatus` (`QUEUED`, `RUNNING`, …).
    pub task_status: Option<String>,
    /// `clientId`.
    pub client_id: Option<String>,
    /// `netWssUrl` (a push channel; only ever an accelerator).
    pub net_wss_url: Option<String>,
    /// `promptTips`, raw.
    pub prompt_tips: Option<String>,
}

impl CreatedTask {
    /// Reads it from `data`; `None` without a `taskId`.
    pub fn from_data(data: &Value) -> Option<Self> {
        let task_id = match data.get("taskId")? {
            Value::String(s) if !s.is_empty() => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return None,
        };
        let s = |k: &str| {
            data.get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        Some(CreatedTask {
            task_id,
            task_status: s("taskStatus"),
            client_id: s("clientId"),
            net_wss_url: s("netWssUrl"),
            prompt_tips: s("promptTips"),
        })
    }
}

/// One entry of the outputs list.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OutputFile {
    /// `fileUrl`.
    pub file_url: String,
    /// `fileType` (`png`, `mp4`, …).
    pub file_type: String,
    /// `nodeId`.
    pub node_id: String,
    /// The other fields (`taskCostTime`, `consumeCoins`, `consumeMoney`, …), verbatim.
    pub extra: Map<String, Value>,
}

impl OutputFile {
    /// Reads the outputs list; entries without a `fileUrl` are skipped.
    pub fn list_from(data: &Value) -> Vec<OutputFile> {
        let Some(items) = data.as_array() else {
            return Vec::new();
        };
        items
            .iter()
            .filter_map(|item| {
                let mut m = item.as_object()?.clone();
                let mut take = |k: &str| match m.remove(k) {
                    Some(Value::String(s)) => s,
                    Some(Value::Number(n)) => n.to_string(),
                    _ => String::new(),
                };
                let file_url = take("fileUrl");
                let file_type = take("fileType");
                let node_id = take("nodeId");
                if file_url.is_empty() {
                    return None;
                }
                Some(OutputFile {
                    file_url,
                    file_type,
                    node_id,
                    extra: m,
                })
            })
            .collect()
    }
}

/// A typed RunningHub client. Cheap to clone.
#[derive(Clone)]
pub struct RunningHubClient {
    http: reqwest::Client,
    config: ClientConfig,
}

impl fmt::Debug for RunningHubClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningHubClient")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn join(base: &Url, path: &str) -> Result<Url, String> {
    let mut s = base.as_str().trim_end_matches('/').to_owned();
    s.push_str(path);
    Url::parse(&s).map_err(|e| format!("bad URL: {e}"))
}

impl RunningHubClient {
    /// Builds the client (installs the ring TLS provider if none is).
    pub fn new(config: ClientConfig) -> Result<Self, TransportError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(config.call_timeout)
            .read_timeout(config.download_stall_timeout)
            .build()
            .map_err(|e| TransportError {
                endpoint: "client",
                message: format!("building the HTTP client: {e}"),
                timeout: false,
            })?;
        Ok(RunningHubClient { http, config })
    }

    /// Its settings.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.config.api_key.expose_secret())
    }

    fn err(endpoint: Endpoint, e: reqwest::Error) -> TransportError {
        // reqwest errors name the URL, never the body or headers: no key in them.
        let timeout = e.is_timeout();
        TransportError {
            endpoint: endpoint.path(),
            message: e.without_url().to_string(),
            timeout,
        }
    }

    async fn read(
        endpoint: Endpoint,
        resp: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<Answer, TransportError> {
        let resp = resp.map_err(|e| Self::err(endpoint, e))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| Self::err(endpoint, e))?;
        let envelope = Envelope::parse(&body);
        match envelope {
            // RunningHub answers API errors with HTTP 200; some gateways use 4xx with an
            // envelope (401): trust an envelope with a code whatever the status, except 5xx.
            Some(envelope) if !status.is_server_error() && envelope.code.is_some() => {
                let verdict = classify(endpoint, &envelope);
                Ok(Answer { envelope, verdict })
            }
            _ => Err(TransportError {
                endpoint: endpoint.path(),
                message: if status.is_success() {
                    format!(
                        "HTTP {status} with a body that is not an envelope ({} bytes)",
                        body.len()
                    )
                } else {
                    format!("HTTP {status}")
                },
                timeout: false,
            }),
        }
    }

    /// `POST`s a JSON body (with `apiKey` added) to an endpoint and classifies the answer.
    pub async fn post(&self, endpoint: Endpoint, body: Value) -> Result<Answer, TransportError> {
        let mut body = match body {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        body.insert(
            "apiKey".into(),
            Value::String(self.config.api_key.expose_secret().to_owned()),
        );
        let url =
            join(&self.config.base_url, endpoint.path()).map_err(|message| TransportError {
                endpoint: endpoint.path(),
                message,
                timeout: false,
            })?;
        let resp = self
            .http
            .post(url)
            .header(AUTHORIZATION, self.bearer())
            .json(&Value::Object(body))
            .timeout(self.config.call_timeout)
            .send()
            .await;
        Self::read(endpoint, resp).await
    }

    /// Creates a task (`/task/openapi/create`, or `/task/openapi/ai-app/run` for an AI app).
    pub async fn create(&self, request: &TaskRequest) -> Result<Answer, TransportError> {
        let mut body = json!({
            "addMetadata": false,
            "usePersonalQueue": self.config.use_personal_queue,
        });
        if let Some(t) = &self.config.instance_type {
            body["instanceType"] = json!(t);
        }
        let endpoint = match request {
            TaskRequest::Hosted {
                workflow_id,
                node_info_list,
            } => {
                body["workflowId"] = json!(workflow_id);
                body["nodeInfoList"] = json!(node_info_list);
                Endpoint::Create
            }
            TaskRequest::Full {
                workflow_id,
                workflow,
            } => {
                body["workflowId"] = json!(workflow_id);
                body["nodeInfoList"] = json!([]);
                body["workflow"] = Value::String(workflow.to_string());
                Endpoint::Create
            }
            TaskRequest::AiApp {
                webapp_id,
                node_info_list,
            } => {
                body["webappId"] = json!(webapp_id);
                body["nodeInfoList"] = json!(node_info_list);
                if let Some(m) = body.as_object_mut() {
                    m.remove("usePersonalQueue");
                    m.remove("addMetadata");
                }
                Endpoint::AiAppRun
            }
        };
        self.post(endpoint, body).await
    }

    /// `/task/openapi/status`.
    pub async fn status(&self, task_id: &str) -> Result<Answer, TransportError> {
        self.post(Endpoint::Status, json!({"taskId": task_id}))
            .await
    }

    /// `/task/openapi/outputs`.
    pub async fn outputs(&self, task_id: &str) -> Result<Answer, TransportError> {
        self.post(Endpoint::Outputs, json!({"taskId": task_id}))
            .await
    }

    /// `/task/openapi/cancel`.
    pub async fn cancel(&self, task_id: &str) -> Result<Answer, TransportError> {
        self.post(Endpoint::Cancel, json!({"taskId": task_id}))
            .await
    }

    /// `/uc/openapi/accountStatus`.
    pub async fn account_status(&self) -> Result<Answer, TransportError> {
        self.post(Endpoint::AccountStatus, json!({})).await
    }

    /// `GET /openapi/v2/queue/status` (bearer auth).
    pub async fn queue_status(&self) -> Result<Answer, TransportError> {
        let endpoint = Endpoint::QueueStatus;
        let url =
            join(&self.config.base_url, endpoint.path()).map_err(|message| TransportError {
                endpoint: endpoint.path(),
                message,
                timeout: false,
            })?;
        let resp = self
            .http
            .get(url)
            .header(AUTHORIZATION, self.bearer())
            .timeout(self.config.call_timeout)
            .send()
            .await;
        Self::read(endpoint, resp).await
    }

    /// Uploads a file (multipart field `file`, bearer auth). On success `data.fileName` is the
    /// name a `LoadImage` node takes.
    pub async fn upload(&self, file_name: &str, bytes: Bytes) -> Result<Answer, TransportError> {
        let endpoint = Endpoint::Upload;
        let url =
            join(&self.config.base_url, endpoint.path()).map_err(|message| TransportError {
                endpoint: endpoint.path(),
                message,
                timeout: false,
            })?;
        let part = reqwest::multipart::Part::stream_with_length(
            reqwest::Body::from(bytes.clone()),
            bytes.len() as u64,
        )
        .file_name(file_name.to_owned());
        let form = reqwest::multipart::Form::new().part("file", part);
        let resp = self
            .http
            .post(url)
            .header(AUTHORIZATION, self.bearer())
            .multipart(form)
            .timeout(self.config.upload_timeout)
            .send()
            .await;
        Self::read(endpoint, resp).await
    }

    /// Starts downloading an output's `fileUrl` (no credentials are sent: the URL is a
    /// download link, often on another host). A stall longer than the download stall timeout
    /// ends the stream with an error.
    pub async fn download(&self, file_url: &str) -> Result<reqwest::Response, TransportError> {
        let url = Url::parse(file_url).map_err(|e| TransportError {
            endpoint: "download",
            message: format!("bad fileUrl: {e}"),
            timeout: false,
        })?;
        let resp = tokio::time::timeout(self.config.call_timeout, self.http.get(url).send())
            .await
            .map_err(|_| TransportError {
                endpoint: "download",
                message: "no response head in time".into(),
                timeout: true,
            })?
            .map_err(|e| {
                let timeout = e.is_timeout();
                TransportError {
                    endpoint: "download",
                    message: e.without_url().to_string(),
                    timeout,
                }
            })?;
        Ok(resp)
    }
}
