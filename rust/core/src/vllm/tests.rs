//! Decoder tests on hand-written bodies, one per wire shape.

use base64::Engine as _;

use super::*;

fn body(events: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    for e in events {
        b.extend_from_slice(b"data: ");
        b.extend_from_slice(e.as_bytes());
        b.extend_from_slice(b"\n\n");
    }
    b
}

#[test]
fn completions_two_choices_out_of_order() {
    let b = body(&[
        r#"{"id":"cmpl-1","choices":[{"index":1,"text":"b","logprobs":{"token_logprobs":[-1.5],"top_logprobs":[{"b":-1.5,"c":-2.0}]},"finish_reason":null,"prompt_token_ids":[1,2],"token_ids":[7]}]}"#,
        r#"{"id":"cmpl-1","choices":[{"index":0,"text":"a","logprobs":{"token_logprobs":[null],"top_logprobs":[{"a":-9999.0}]},"finish_reason":"length","stop_reason":null,"token_ids":[5]}]}"#,
        r#"{"id":"cmpl-1","choices":[{"index":1,"text":"!","logprobs":{"token_logprobs":[-0.5],"top_logprobs":[{"!":-0.5}]},"finish_reason":"stop","stop_reason":42,"token_ids":[9]}]}"#,
        r#"{"id":"cmpl-1","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5},"metrics":{"queue_time_ms":1.5,"speculative_decoding":null}}"#,
        "[DONE]",
    ]);
    let out = decode_stream(&b).unwrap();
    assert_eq!(out.request_id.as_deref(), Some("cmpl-1"));
    assert_eq!(out.choices.len(), 2);
    let c0 = &out.choices[0];
    assert_eq!(c0.index, 0);
    assert_eq!(c0.token_ids, vec![5]);
    assert!(c0.logprobs[0].is_nan());
    assert_eq!(c0.top_logprobs.as_ref().unwrap().logprobs, vec![-9999.0]);
    let c1 = &out.choices[1];
    assert_eq!(c1.token_ids, vec![7, 9]);
    assert_eq!(c1.text, "b!");
    assert_eq!(c1.logprobs, vec![-1.5, -0.5]);
    assert_eq!(c1.stop_reason, Some(StopReason::Token(42)));
    assert_eq!(c1.prompt_token_ids, Some(vec![1, 2]));
    let top = c1.top_logprobs.as_ref().unwrap();
    assert_eq!(top.offsets, vec![0, 2, 3]);
    assert_eq!(top.tokens.get(1), Some("c"));
    assert_eq!(out.usage.as_ref().unwrap().completion_tokens, 3);
    assert_eq!(out.metrics, vec![("queue_time_ms".to_string(), 1.5)]);
}

#[test]
fn generate_endpoint_ids_ranks_masks_versions() {
    let b = body(&[
        r#"{"request_id":"r1","choices":[{"index":0,"token_ids":[4,5],"sampling_mask":[[4,1],[5]],"logprobs":{"content":[{"token_id":4,"logprob":-1.0,"rank":2,"top_logprobs":[{"token_id":1,"logprob":-0.5,"rank":1}]},{"token_id":5,"logprob":-2.0,"rank":1,"top_logprobs":[{"token_id":5,"logprob":-2.0,"rank":1}]}]}}]}"#,
        r#"{"request_id":"r1","choices":[{"index":0,"token_ids":[6],"finish_reason":"length","sampling_mask":[[6,7,8]],"weight_versions":[{"version":"v2","start":0,"end":3}],"logprobs":{"content":[{"token_id":6,"logprob":-3.0,"rank":3,"top_logprobs":[]}]}}]}"#,
        "[DONE]",
    ]);
    let out = decode_stream(&b).unwrap();
    let c = &out.choices[0];
    assert_eq!(out.request_id.as_deref(), Some("r1"));
    assert_eq!(c.token_ids, vec![4, 5, 6]);
    assert_eq!(c.ranks, vec![2, 1, 3]);
    let top = c.top_logprobs.as_ref().unwrap();
    assert_eq!(top.token_ids, vec![1, 5]);
    assert_eq!(top.offsets, vec![0, 1, 2, 2]);
    let (ids, offs) = c.sampling_mask.as_ref().unwrap();
    assert_eq!(ids, &vec![4, 1, 5, 6, 7, 8]);
    assert_eq!(offs, &vec![0, 2, 3, 6]);
    assert_eq!(c.weight_versions, vec![WeightVersionSpan { version: "v2".into(), start: 0, end: 3 }]);
}

#[test]
fn echo_splits_prompt_logprobs() {
    let b = body(&[
        r#"{"id":"e","choices":[{"index":0,"text":"x","logprobs":{"token_logprobs":[null,-1.0,-2.0],"top_logprobs":[null,{"a":-1.0},{"x":-2.0,"y":-3.0}]},"prompt_token_ids":[7,8],"token_ids":[9]}]}"#,
        r#"{"id":"e","choices":[{"index":0,"text":"z","logprobs":{"token_logprobs":[-4.0],"top_logprobs":[{"z":-4.0}]},"finish_reason":"length","token_ids":[10]}]}"#,
        "[DONE]",
    ]);
    let out = decode_stream(&b).unwrap();
    let c = &out.choices[0];
    assert_eq!(c.token_ids, vec![9, 10]);
    assert_eq!(c.logprobs, vec![-2.0, -4.0]);
    assert!(c.prompt_logprobs[0].is_nan());
    assert_eq!(c.prompt_logprobs[1], -1.0);
    assert_eq!(c.prompt_top_logprobs.as_ref().unwrap().offsets, vec![0, 0, 1]);
    assert_eq!(c.top_logprobs.as_ref().unwrap().offsets, vec![0, 2, 3]);
}

#[test]
fn token_id_strings_become_ids() {
    let b = body(&[
        r#"{"choices":[{"index":0,"delta":{"content":"x"},"logprobs":{"content":[{"token":"token_id:3","logprob":-1.0,"top_logprobs":[{"token":"token_id:3","logprob":-1.0},{"token":"token_id:9","logprob":-2.0}]}]},"token_ids":[3]}]}"#,
        "[DONE]",
    ]);
    let out = decode_stream(&b).unwrap();
    let top = out.choices[0].top_logprobs.as_ref().unwrap();
    assert_eq!(top.token_ids, vec![3, 9]);
    assert!(top.tokens.is_empty());
}

#[test]
fn server_error_event_is_recorded() {
    let b = body(&[
        r#"{"choices":[{"index":0,"text":"a","token_ids":[1]}]}"#,
        r#"{"error":{"message":"boom","type":"InternalServerError","param":null,"code":500}}"#,
        "[DONE]",
    ]);
    let out = decode_stream(&b).unwrap();
    let e = out.error.unwrap();
    assert_eq!(e.message, "boom");
    assert_eq!(e.code.as_deref(), Some("500"));
    assert_eq!(e.error_type.as_deref(), Some("InternalServerError"));
}

#[test]
fn truncation_and_missing_done() {
    let full = body(&[r#"{"choices":[{"index":0,"text":"a","token_ids":[1]}]}"#, "[DONE]"]);
    for cut in [full.len() - 1, full.len() - 3, 10] {
        let e = decode_stream(&full[..cut]).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::Truncated, "cut {cut}");
    }
    let no_done = body(&[r#"{"choices":[]}"#]);
    assert_eq!(decode_stream(&no_done).unwrap_err().kind, DecodeErrorKind::Truncated);
}

#[test]
fn malformed_input_is_a_protocol_error_with_offset() {
    let b = body(&[r#"{"choices":[{"index":0,"token_ids":[1,}]}"#, "[DONE]"]);
    let e = decode_stream(&b).unwrap_err();
    assert_eq!(e.kind, DecodeErrorKind::Protocol);
    assert!(e.offset >= 6 && e.offset < 50, "{e}");
    for bad in [
        r#"{"choices":[{"index":0,"token_ids":["x"]}]}"#,
        r#"{"choices":[{"index":0,"token_ids":[-1]}]}"#,
        r#"{"choices":[{"index":0,"token_ids":[99999999999999999999999]}]}"#,
        r#"{"choices":[{"index":0,"token_ids":[1],"logprobs":{"token_logprobs":[-1,-2]}}]}"#,
        r#"{"choices":[{"token_ids":[1]}]}"#,
        r#"{"choices":[{"index":0,"routed_experts":"!!"}]}"#,
    ] {
        let e = decode_stream(&body(&[bad, "[DONE]"])).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::Protocol, "{bad}");
    }
    let e = decode_stream(b"data: {\"choices\":[{\"index\":0,\"text\":\"\xff\"}]}\n\ndata: [DONE]\n\n").unwrap_err();
    assert_eq!(e.kind, DecodeErrorKind::Protocol);
}

#[test]
fn unknown_fields_are_ignored_and_events_after_done_rejected() {
    let b = body(&[r#"{"new_field":{"x":[1,2]},"choices":[{"index":0,"token_ids":[1],"extra":true}]}"#, "[DONE]"]);
    assert_eq!(decode_stream(&b).unwrap().choices[0].token_ids, vec![1]);
    let b = body(&["[DONE]", r#"{"choices":[]}"#]);
    assert_eq!(decode_stream(&b).unwrap_err().kind, DecodeErrorKind::Protocol);
}

#[test]
fn routed_experts_rows_concatenate() {
    fn npy_b64(rows: usize) -> String {
        let data: Vec<u8> = (0..(rows * 2) as i32).flat_map(|v| v.to_le_bytes()).collect();
        base64::engine::general_purpose::STANDARD.encode(crate::npy::npy_for_tests(
            "<i4",
            &format!("({rows}, 2)"),
            &data,
        ))
    }
    let e1 = format!(r#"{{"choices":[{{"index":0,"token_ids":[1],"routed_experts":"{}"}}]}}"#, npy_b64(1));
    let e2 = format!(r#"{{"choices":[{{"index":0,"token_ids":[2,3],"routed_experts":"{}"}}]}}"#, npy_b64(2));
    let out = decode_stream(&body(&[&e1, &e2, "[DONE]"])).unwrap();
    let re = out.choices[0].routed_experts.as_ref().unwrap();
    assert_eq!(re.shape, vec![3, 2]);
    assert_eq!(re.data.len(), 24);
}

#[test]
fn runaway_event_is_a_protocol_error_not_unbounded_memory() {
    let mut d = StreamDecoder::with_max_event_bytes(1024);
    d.feed(b"data: {\"choices\":[]}\n\ndata: ").unwrap();
    let e = (0..100).find_map(|_| d.feed(&[b'x'; 100]).err()).expect("the cap is enforced");
    assert_eq!(e.kind, DecodeErrorKind::Protocol);
    assert_eq!(e.offset, 22, "the offset names the runaway event");
    assert!(e.message.contains("max_event_bytes=1024"), "{e}");
    // The default is generous: a 1 MiB event decodes.
    let big = format!(r#"{{"choices":[{{"index":0,"text":"{}","token_ids":[1]}}]}}"#, "y".repeat(1 << 20));
    assert_eq!(decode_stream(&body(&[&big, "[DONE]"])).unwrap().choices[0].text.len(), 1 << 20);
}

#[test]
fn routed_expert_row_counts_cannot_overflow() {
    // Zero-width rows hold no bytes, so a huge row count is cheap to claim.
    let huge = format!("({}, 0)", usize::MAX - 1);
    let npy = base64::engine::general_purpose::STANDARD.encode(crate::npy::npy_for_tests("<i4", &huge, &[]));
    let e = format!(r#"{{"choices":[{{"index":0,"token_ids":[1],"routed_experts":"{npy}"}}]}}"#);
    let err = decode_stream(&body(&[&e, &e, "[DONE]"])).unwrap_err();
    assert_eq!(err.kind, DecodeErrorKind::Protocol);
    assert!(err.message.contains("overflows"), "{err}");
}
