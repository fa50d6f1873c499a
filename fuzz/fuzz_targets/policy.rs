//! The key-policy parser: arbitrary text as a policy document; anything accepted is evaluated
//! against a few requests. Must never panic.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use nbdcrypt::kms::policy::{RequestFacts, parse};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = parse(text) else { return };
    let mut context = BTreeMap::new();
    context.insert("nbdcrypt:volume".to_owned(), "db".to_owned());
    for action in ["Decrypt", "GenerateDataKey", "ReEncryptFrom", "DescribeKey"] {
        let _ = policy.evaluate(&RequestFacts {
            principal: "arn:nbdcrypt:iam::000000000000:user/serve",
            account: "000000000000",
            via_service: Some("nbdcrypt"),
            action,
            resource: "arn:nbdcrypt:kms:local:000000000000:key/k",
            context: &context,
        });
    }
});
