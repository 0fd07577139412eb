//! Adaptation handlers a patch declares with `DYNAMOS_ADAPTATION_HANDLER`
//! (templates/dynamos.h): which function each one chooses a version of,
//! and whether the declaration is one a generated dispatcher can honour.
//!
//! The macro leaves a pointer to the handler in `.discard.dynamos.adaptation`
//! under the symbol `__dynamos_adaptation__<function>`; the kernel's own
//! link would drop the section, and the diff never compares it.

use super::object::ObjectFile;
use super::signature::{signatures, Signature};
use super::{covering_symbol, ChangeKind, FunctionChange};
use crate::error::Refusal;
use object::elf;

pub const RECORD_SECTION: &str = ".discard.dynamos.adaptation";
const RECORD_PREFIX: &str = "__dynamos_adaptation__";

/// Registers a dispatcher passes through unchanged: the handler and both
/// versions see the call's arguments exactly as the caller left them.
pub const MAX_REGISTER_ARGUMENTS: usize = 6;

/// `handler` chooses, per call, which version of `function` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdaptationHandler {
    /// The replaced function, as the running kernel names it.
    pub function: String,
    /// The handler, a function new in the patched object.
    pub handler: String,
    /// How many argument registers the function takes (at most six).
    pub arguments: usize,
}

/// The handlers declared in `patched`, checked against what the patch
/// changes: a refusal for each declaration no dispatcher can honour.
pub fn declared_handlers(
    orig: &ObjectFile,
    patched: &ObjectFile,
    functions: &[FunctionChange],
) -> (Vec<AdaptationHandler>, Vec<Refusal>) {
    let mut handlers = Vec::new();
    let mut refused = Vec::new();
    let Some(section) = patched.section_by_name(RECORD_SECTION) else {
        return (handlers, refused);
    };
    for &index in &patched.symbols_in(section) {
        let record = &patched.symbols[index];
        let Some(function) = record.name.strip_prefix(RECORD_PREFIX) else {
            continue;
        };
        let refuse = |reason: String| Refusal {
            symbol: function.to_string(),
            reason,
        };
        let handler = match handler_of(patched, section, record.value) {
            Some(h) => h,
            None => {
                refused.push(refuse(
                    "its adaptation handler is not a function defined in this file".into(),
                ));
                continue;
            }
        };
        match check(orig, patched, functions, function, &handler) {
            Ok(arguments) => handlers.push(AdaptationHandler {
                function: function.to_string(),
                handler,
                arguments,
            }),
            Err(reason) => refused.push(refuse(reason)),
        }
    }
    handlers.sort_by(|a, b| a.function.cmp(&b.function));
    (handlers, refused)
}

/// The function the record at `offset` of the record section points at.
fn handler_of(patched: &ObjectFile, section: usize, offset: u64) -> Option<String> {
    let reloc = patched.sections[section]
        .relocs
        .iter()
        .find(|r| r.offset == offset && r.r_type == elf::R_X86_64_64)?;
    let target = &patched.symbols[reloc.symbol];
    let symbol = if target.is_section() {
        let code = target.section()?;
        let s = covering_symbol(patched, code, reloc.addend)?;
        (patched.symbols[s].value == reloc.addend as u64).then_some(s)?
    } else {
        (reloc.addend == 0).then_some(reloc.symbol)?
    };
    let symbol = &patched.symbols[symbol];
    (symbol.is_function() && symbol.section().is_some()).then(|| symbol.name.clone())
}

fn check(
    orig: &ObjectFile,
    patched: &ObjectFile,
    functions: &[FunctionChange],
    function: &str,
    handler: &str,
) -> Result<usize, String> {
    let defines = |obj: &ObjectFile| {
        obj.symbols
            .iter()
            .any(|s| s.name == function && s.is_function() && s.section().is_some())
    };
    match functions.iter().find(|f| f.name == function) {
        Some(f) if f.kind == ChangeKind::Changed => {}
        Some(_) => {
            return Err(
                "has an adaptation handler but is new in the patch: no earlier version to choose"
                    .into(),
            )
        }
        None if !defines(orig) || !defines(patched) => {
            return Err(
                "has an adaptation handler but is inlined everywhere it is called: no out-of-line copy for a dispatcher to replace"
                    .into(),
            )
        }
        None => {
            return Err(
                "has an adaptation handler but the patch does not change it (only a replaced function can be dispatched)"
                    .into(),
            )
        }
    }
    if !functions
        .iter()
        .any(|f| f.name == handler && f.kind == ChangeKind::New)
    {
        return Err(format!(
            "its adaptation handler {handler} must be a function the patch adds"
        ));
    }
    let found = signatures(patched, &[function, handler])
        .map_err(|e| format!("cannot read the debug info to check its handler: {e:#}"))?;
    let (Some(target), Some(chooser)) = (found.get(function), found.get(handler)) else {
        return Err(format!(
            "cannot check its adaptation handler {handler}: the debug info does not describe both functions"
        ));
    };
    check_signatures(target, handler, chooser).map(|()| target.parameters.len())
}

/// The handler takes exactly the function's parameters and returns bool;
/// a dispatcher passes at most six register arguments through.
pub fn check_signatures(
    target: &Signature,
    handler: &str,
    chooser: &Signature,
) -> Result<(), String> {
    let expected = Signature {
        returns: "_Bool".into(),
        parameters: target.parameters.clone(),
        variadic: target.variadic,
    };
    if chooser != &expected {
        return Err(format!(
            "its adaptation handler {handler} is {}, not {} (the function's parameters, returning bool)",
            chooser.describe().replace("_Bool", "bool"),
            expected.describe().replace("_Bool", "bool")
        ));
    }
    if target.variadic
        || target.parameters.len() > MAX_REGISTER_ARGUMENTS
        || target.parameters.iter().any(|p| !p.in_register)
    {
        return Err(format!(
            "cannot be dispatched: {} does not pass all its arguments in registers (at most {MAX_REGISTER_ARGUMENTS} integers or pointers)",
            target.describe()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::signature::Parameter;

    fn signature(returns: &str, parameters: &[&str]) -> Signature {
        Signature {
            returns: returns.into(),
            parameters: parameters
                .iter()
                .map(|p| Parameter {
                    type_name: p.to_string(),
                    in_register: !p.starts_with("struct") || p.ends_with('*'),
                })
                .collect(),
            variadic: false,
        }
    }

    #[test]
    fn a_handler_must_take_the_functions_parameters_and_return_bool() {
        let function = signature("int", &["struct seq_file *", "void *"]);
        let good = signature("_Bool", &["struct seq_file *", "void *"]);
        assert_eq!(check_signatures(&function, "h", &good), Ok(()));
        let returns_int = signature("int", &["struct seq_file *", "void *"]);
        let err = check_signatures(&function, "h", &returns_int).unwrap_err();
        assert!(
            err.contains(
                "h is int (struct seq_file *, void *), not bool (struct seq_file *, void *)"
            ),
            "{err}"
        );
        let fewer = signature("_Bool", &["struct seq_file *"]);
        assert!(check_signatures(&function, "h", &fewer).is_err());
    }

    #[test]
    fn a_struct_by_value_or_seven_arguments_cannot_be_dispatched() {
        let by_value = signature("int", &["struct timespec64"]);
        let handler = signature("_Bool", &["struct timespec64"]);
        let err = check_signatures(&by_value, "h", &handler).unwrap_err();
        assert!(
            err.contains("does not pass all its arguments in registers"),
            "{err}"
        );
        let seven = ["long"; 7];
        assert!(
            check_signatures(&signature("int", &seven), "h", &signature("_Bool", &seven)).is_err()
        );
    }
}
