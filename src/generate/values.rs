//! Value updates in the generated module: the manifest entries for the
//! changed initial values the diff found, and the C table the template's
//! klp callbacks write from (`templates/livepatch.c`, "Value updates").
//!
//! The variable's address reaches the module like any other kernel
//! symbol: an undefined `__dynamos_value_N` that the manifest lists among
//! the externals and `dynamos apply` resolves from kallsyms (or the build
//! binds, for a signed module).

use super::TranslationUnit;
use crate::apply::ObjectSymbols;
use crate::error::Refusal;
use crate::package::{ExternalSymbol, ObjectUpdate, SourceObject, SymbolKind, ValueUpdate};

/// Undefined symbol of the module that holds variable `index`'s address.
fn value_symbol(index: usize) -> String {
    format!("__dynamos_value_{index}")
}

/// Record `unit`'s value updates in `update` (vmlinux's entry) with the
/// externals that carry the variables' addresses. Refused for a module's
/// variables, and, where the target's symbol table is known, for one it
/// does not tie to exactly one kernel symbol.
pub fn add_value_updates(
    update: &mut ObjectUpdate,
    unit: &TranslationUnit,
    file_symbols: &[String],
    vmlinux: Option<&ObjectSymbols>,
) -> Vec<Refusal> {
    let mut refusals = Vec::new();
    for change in &unit.diff.value_updates {
        if unit.kernel_object != "vmlinux" {
            // A module loaded later would start from its old initial value,
            // and its variables have no address before it loads.
            refusals.push(Refusal {
                symbol: change.name.clone(),
                reason: format!(
                    "changed initial value of a variable of module {}: value updates cover vmlinux variables only",
                    unit.kernel_object
                ),
            });
            continue;
        }
        let global = unit
            .original
            .symbols
            .iter()
            .any(|s| s.name == change.name && s.is_object() && !s.is_local());
        let external = ExternalSymbol {
            module_symbol: value_symbol(update.value_updates.len()),
            name: change.name.clone(),
            kind: SymbolKind::Data,
            file: (!global).then(|| unit.source_file.clone()),
            bound_at_build: None,
            global,
        };
        if let Some(symbols) = vmlinux {
            let unbound = super::target_symbols::unbound_references(
                std::slice::from_ref(&external),
                symbols,
                file_symbols,
            );
            if !unbound.is_empty() {
                refusals.extend(unbound);
                continue;
            }
        }
        update.value_updates.push(ValueUpdate {
            name: change.name.clone(),
            file: unit.source_file.clone(),
            module_symbol: external.module_symbol.clone(),
            old: change.old.clone(),
            new: change.new.clone(),
        });
        update.externals.push(external);
    }
    // The resolver tells same-named statics apart by their file's symbols.
    if !update.value_updates.is_empty() && !update.files.iter().any(|f| f.file == unit.source_file)
    {
        update.files.push(SourceObject {
            file: unit.source_file.clone(),
            symbols: file_symbols.to_vec(),
        });
    }
    refusals
}

/// The template's value-update placeholders: `{{value_update_count}}`,
/// `{{value_update_object}}` (index of vmlinux in `objects[]`) and
/// `{{value_update_table}}` (declarations and the table itself).
pub fn render(template: &str, objects: &[ObjectUpdate]) -> String {
    let found = objects
        .iter()
        .enumerate()
        .find(|(_, o)| !o.value_updates.is_empty());
    let (object_index, updates) = match found {
        Some((index, object)) => (index, object.value_updates.as_slice()),
        None => (0, &[][..]),
    };
    let bytes = |b: &[u8]| {
        b.iter()
            .map(|x| format!("{x:#04x}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut table = String::new();
    for (i, v) in updates.iter().enumerate() {
        table.push_str(&format!(
            "extern char {}[]; /* {} in {} */\n\
             static const unsigned char old_value_{i}[] = {{ {} }};\n\
             static const unsigned char new_value_{i}[] = {{ {} }};\n",
            v.module_symbol,
            v.name,
            v.file,
            bytes(&v.old),
            bytes(&v.new)
        ));
    }
    if !updates.is_empty() {
        table.push_str("\nstatic const struct value_update value_updates[] = {\n");
        for (i, v) in updates.iter().enumerate() {
            table.push_str(&format!(
                "\t{{ \"{}\", {}, {}, old_value_{i}, new_value_{i} }},\n",
                v.name,
                v.module_symbol,
                v.old.len()
            ));
        }
        table.push_str("};");
    }
    template
        .replace("{{value_update_count}}", &updates.len().to_string())
        .replace("{{value_update_object}}", &object_index.to_string())
        .replace("{{value_update_table}}", table.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vmlinux_with(updates: Vec<ValueUpdate>) -> ObjectUpdate {
        ObjectUpdate {
            object: "vmlinux".into(),
            value_updates: updates,
            ..ObjectUpdate::default()
        }
    }

    #[test]
    fn the_template_gets_a_table_of_the_updates() {
        let template = include_str!("../../templates/livepatch.c");
        let update = ValueUpdate {
            name: "lease_break_time".into(),
            file: "fs/locks.c".into(),
            module_symbol: value_symbol(0),
            old: 45i32.to_le_bytes().to_vec(),
            new: 20i32.to_le_bytes().to_vec(),
        };
        let c = render(template, &[vmlinux_with(vec![update])]);
        assert!(c.contains("#define VALUE_UPDATES 1\n"), "{c}");
        assert!(c.contains("#define VALUE_UPDATE_OBJECT 0\n"), "{c}");
        assert!(c.contains("extern char __dynamos_value_0[]; /* lease_break_time in fs/locks.c */"));
        assert!(
            c.contains("static const unsigned char old_value_0[] = { 0x2d, 0x00, 0x00, 0x00 };")
        );
        assert!(
            c.contains("static const unsigned char new_value_0[] = { 0x14, 0x00, 0x00, 0x00 };")
        );
        assert!(c.contains(
            "\t{ \"lease_break_time\", __dynamos_value_0, 4, old_value_0, new_value_0 },"
        ));
        assert!(!c.contains("{{value_update"), "{c}");

        let none = render(template, &[vmlinux_with(vec![])]);
        assert!(none.contains("#define VALUE_UPDATES 0\n"));
        assert!(!none.contains("{{value_update"));
    }
}
