/* SPDX-License-Identifier: GPL-2.0 */
/*
 * dynamos.h: what a patch built by dynamos-build may declare about its own
 * live update. dynamos-build puts this header on the include path of the
 * patched build only: the original source never sees it, and a patch that
 * does not include it builds exactly as before.
 *
 * The macros leave records in sections named .discard.dynamos.*, which
 * dynamos-build reads from the patched object and the kernel's own link
 * would drop. They generate no code of their own. docs/adaptation-handlers.md
 * is the patch author's guide.
 */
#ifndef _DYNAMOS_H
#define _DYNAMOS_H

#include <linux/compiler.h>
#include <linux/types.h>

/*
 * DYNAMOS_ADAPTATION_HANDLER(function, handler)
 *
 * After the update both versions of `function` stay in the kernel: the one
 * compiled from the original source and the one from the patched source.
 * On every call, `handler` runs first with the call's own arguments and
 * chooses: true runs the new version, false the version that ran before
 * the update. `handler` must be a function of this file with exactly the
 * parameters of `function` and return type bool.
 *
 * Naming `function` here does not take its address: a function the
 * compiler inlined everywhere stays so, and dynamos-build refuses it.
 *
 * It runs in the caller's context, before `function` does: it may not
 * sleep where `function` may be called in atomic context, may not take a
 * lock `function`'s callers hold, and must not call `function` itself.
 * `dynamos promote` ends the choice: the new version then serves every
 * call and the handler is no longer called.
 */
#define DYNAMOS_ADAPTATION_HANDLER(function, handler)				\
	_Static_assert(sizeof(&(function)) != 0, "declared: " #function);	\
	static void *const __dynamos_adaptation__##function			\
	__used __section(".discard.dynamos.adaptation") = (void *)(handler)

#endif /* _DYNAMOS_H */
