//! Hostile bytes into the package reader, twice: as a whole package file,
//! and as the contents of a file signed with a trusted key, so the payload
//! parser behind the signature check is reached too.
#![no_main]

use dynamos::package::{self, FORMAT_VERSION, MAGIC};
use ed25519_dalek::{Signer, SigningKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = package::read_unverified(data);

    let key = SigningKey::from_bytes(&[7; 32]);
    let mut file = MAGIC.to_vec();
    file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(data);
    let signature = key.sign(&file);
    file.extend_from_slice(key.verifying_key().as_bytes());
    file.extend_from_slice(&signature.to_bytes());
    if let Ok(pkg) = package::read_verified(&file, &[key.verifying_key()]) {
        // What was read is a package: written again, it reads back the same.
        let again = package::write_signed(&pkg, &key);
        let reread = package::read_verified(&again, &[key.verifying_key()]);
        assert_eq!(reread.ok().as_ref(), Some(&pkg));
    }
});
