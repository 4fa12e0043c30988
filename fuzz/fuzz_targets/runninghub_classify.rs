//! The RunningHub classifier on arbitrary response bodies: `Envelope::parse` and `classify` for
//! every endpoint. Both are total (a value for any bytes), and the verdicts keep the rules the
//! crate documents: progress markers in `msg` win over everything, only `code = 0` succeeds,
//! the endpoint matters only for `code = 0`, and errors are exactly the verdicts with an error.

#![no_main]

use comfyfleet_runninghub::classify::{
    CODE_SUCCESS, Endpoint, Envelope, MSG_QUEUED, MSG_RUNNING, Verdict, classify,
};
use comfyfleet_runninghub::client::{CreatedTask, OutputFile};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const ENDPOINTS: [Endpoint; 8] = [
    Endpoint::Create,
    Endpoint::AiAppRun,
    Endpoint::Status,
    Endpoint::Outputs,
    Endpoint::Cancel,
    Endpoint::Upload,
    Endpoint::AccountStatus,
    Endpoint::QueueStatus,
];

fuzz_target!(|data: &[u8]| {
    let Some(env) = Envelope::parse(data) else {
        // Only a body that is not a JSON object has no envelope.
        assert!(!matches!(
            serde_json::from_slice::<Value>(data),
            Ok(Value::Object(_))
        ));
        return;
    };
    let upper = env.msg.to_ascii_uppercase();
    let verdicts: Vec<Verdict> = ENDPOINTS.iter().map(|e| classify(*e, &env)).collect();
    for (endpoint, verdict) in ENDPOINTS.iter().zip(&verdicts) {
        assert_eq!(verdict.is_error(), verdict.to_error().is_some());
        if let Some(e) = verdict.to_error() {
            assert!(!e.message.is_empty());
        }
        if upper.contains(MSG_RUNNING) {
            assert_eq!(verdict, &Verdict::Running);
        } else if upper.contains(MSG_QUEUED) {
            assert_eq!(verdict, &Verdict::Queued);
        }
        if let Verdict::Succeeded(result) = verdict {
            assert_eq!(env.code, Some(CODE_SUCCESS), "success without code 0");
            match endpoint {
                Endpoint::Create | Endpoint::AiAppRun => {
                    assert!(
                        CreatedTask::from_data(result).is_some(),
                        "success without a task"
                    );
                }
                Endpoint::Outputs => {
                    assert!(result.is_array());
                    let _ = OutputFile::list_from(result);
                }
                _ => {}
            }
        }
    }
    // Outside the success path the endpoint does not change the verdict.
    if env.code != Some(CODE_SUCCESS) {
        assert!(verdicts.windows(2).all(|w| w[0] == w[1]), "{verdicts:?}");
    }
});
