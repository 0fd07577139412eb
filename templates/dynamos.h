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
#include <linux/atomic.h>
#include <linux/rcupdate.h>

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

/*
 * DYNAMOS_SYNCHRONIZED(function)
 *
 * Update `function` without waiting for the tasks asleep in it and without
 * signalling them (docs/synchronized-updates.md). dynamos-build writes a
 * transitional clone holding the original and the patched code; after each
 * wait_event*() statement found in both, a task asleep there continues at
 * the same statement of the other code, with the locals in scope carried
 * over. The update then runs in phases driven by `dynamos apply`: calls go
 * to the clone's original code, sleepers move to the patched code, calls
 * start in the patched code. `dynamos revert` runs them backwards.
 *
 * Place it after `function` in the patched file. dynamos-build refuses,
 * naming the function and the sleep point, what it cannot carry over.
 *
 * With DYNAMOS_ADAPTATION_HANDLER(function, handler) as well, the handler
 * chooses, per call, whether a call starts in the patched code, and, per
 * sleeper, whether it moves there: the others stay in the original code.
 * It is then also called inside the wait condition, in the sleeper's
 * context: it may not sleep.
 */
#define DYNAMOS_SYNCHRONIZED(function)						\
	_Static_assert(sizeof(&(function)) != 0, "synchronized: " #function)

/*
 * DYNAMOS_SLEEP_POINTS_MATCH(function)
 *
 * The sleep points of the original and the patched `function` correspond
 * in order even where the patch changed their statements (a new wait
 * condition, say): a sleeper at the k-th of one version continues at the
 * k-th of the other. Without it dynamos-build pairs only identical
 * statements and refuses the others.
 */
#define DYNAMOS_SLEEP_POINTS_MATCH(function)					\
	_Static_assert(sizeof(&(function)) != 0, "sleep points match: " #function)

/*
 * Shared by a transitional clone and the update module that drives it.
 * Body 0 is the original code, body 1 the patched code.
 */
struct dynamos_sync {
	int entry;		/* the body new calls start in */
	int leave;		/* 0, or 1 + the body sleepers leave */
	atomic_t running[2];	/* tasks in each body */
	atomic_t moved[2];	/* tasks that left each body at a sleep point */
};

#define DYNAMOS_SYNC_LEAVING(sync, body) (READ_ONCE((sync)->leave) == (body) + 1)

/*
 * The read of `entry` and the count it selects form one RCU read-side
 * section: once the module has changed `entry` and waited for a grace
 * period, every call counted in the old body is in `running`.
 */
static __always_inline int dynamos_sync_enter(struct dynamos_sync *sync, bool new_code)
{
	int body;

	rcu_read_lock();
	body = READ_ONCE(sync->entry) && new_code ? 1 : 0;
	atomic_inc(&sync->running[body]);
	rcu_read_unlock();
	return body;
}

/*
 * With an adaptation handler, it chooses (outside the RCU section: it may
 * take locks) whether a call that may start in the patched body does.
 */
#define DYNAMOS_SYNC_ENTER(sync, choice)					\
	dynamos_sync_enter(sync, READ_ONCE((sync)->entry) ? (choice) : false)
#define DYNAMOS_SYNC_EXIT(sync, body) atomic_dec(&(sync)->running[body])
#define DYNAMOS_SYNC_MOVE(sync, body_ptr, from, to)				\
	do {									\
		*(body_ptr) = (to);						\
		atomic_inc(&(sync)->running[to]);				\
		atomic_dec(&(sync)->running[from]);				\
		atomic_inc(&(sync)->moved[from]);				\
	} while (0)

/*
 * Kernel threads restarted into a new version of their main function
 * (docs/architecture.md, "Kernel threads"). dynamos-build gives a changed
 * main function one of these and a restore point just before its main
 * loop; the update module fills it from the old thread's locals where that
 * thread stops (their places at each call come from the original build's
 * debug info) and names the new thread in `restoring`. At the restore
 * point the new thread waits for `ready` (it may have been woken early,
 * through a pointer already switched to it), copies each carried local it
 * declares with the same name, type and initializer, then runs the
 * patch's state-transfer function, if any.
 */
#define DYNAMOS_THREAD_LOCALS 16

struct dynamos_thread {
	struct task_struct *restoring;		/* the thread that restores next */
	int ready;				/* the old thread has stopped */
	unsigned long carried;			/* bit i: value[i] was carried */
	unsigned long long value[DYNAMOS_THREAD_LOCALS];
	const char *const *names;		/* the original's locals, by index */
	unsigned int count;
};

/* The old thread's local `name`, if it was carried, in *value. */
static inline bool dynamos_thread_old(const struct dynamos_thread *old, const char *name,
				      unsigned long long *value)
{
	unsigned int i;

	for (i = 0; i < old->count && i < DYNAMOS_THREAD_LOCALS; i++) {
		if (__builtin_strcmp(old->names[i], name) || !(old->carried & (1UL << i)))
			continue;
		*value = old->value[i];
		return true;
	}
	return false;
}

/*
 * DYNAMOS_THREAD_STATE(function, transfer)
 *
 * `function` is the main function of kernel threads; when `dynamos apply`
 * restarts them, `transfer` runs in each new thread just before its main
 * loop, after the locals carried by name and type are restored. It is
 * called as
 *
 *	transfer(old, &local1, &local2, ...)
 *
 * with `old` the saved state (read it with dynamos_thread_old()) and the
 * addresses of the locals the patched `function` declares at the top of
 * its body, in order. It sets what the new version needs that the old one
 * did not have, or had under another name or type.
 */
#define DYNAMOS_THREAD_STATE(function, transfer)				\
	_Static_assert(sizeof(&(function)) + sizeof(&(transfer)) != 0,		\
		       "thread state: " #function)

/*
 * DYNAMOS_SHADOW_FREE(object)
 *
 * A member the patch adds to a struct or union lives in shadow data keyed
 * by the object's address (docs/shadow-members.md); the shadow is freed
 * where the object is. dynamos-build finds the kfree(), kvfree(),
 * kmem_cache_free() and kfree_rcu() of such an object in the files the
 * patch changes by itself. Where an object is freed some other way (a
 * destructor, a pointer without the struct's type), write this before the
 * free, in a file of the patch: it frees the shadows of `object`'s type,
 * and does nothing for a type without added members.
 */
#define DYNAMOS_SHADOW_FREE(object) ((void)(object))

#endif /* _DYNAMOS_H */
