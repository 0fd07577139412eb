// SPDX-License-Identifier: GPL-2.0
/*
 * Column (d) of `cargo bench --bench overhead`: an ftrace direct call at
 * the entry of each function whose address is given in ips=, to a
 * trampoline that only returns into the function. A redirect through a
 * direct call would jump to the new version instead of returning: this is
 * the floor of its cost, to set beside the livepatch (IPMODIFY) redirect.
 */
#include <linux/module.h>
#include <linux/ftrace.h>
#include <asm/ibt.h>
#include <asm/linkage.h>

extern void direct_return_tramp(void);
asm(
"	.pushsection .text, \"ax\", @progbits\n"
"	.type direct_return_tramp, @function\n"
"	.globl direct_return_tramp\n"
"direct_return_tramp:\n"
	ASM_ENDBR
	ASM_RET
"	.size direct_return_tramp, .-direct_return_tramp\n"
"	.popsection\n"
);

static unsigned long ips[16];
static int nr_ips;
module_param_array(ips, ulong, &nr_ips, 0444);
static int attached;

static int __init direct_return_init(void)
{
	int i, ret;

	for (i = 0; i < nr_ips; i++) {
		ret = register_ftrace_direct(ips[i], (unsigned long)direct_return_tramp);
		if (ret) {
			pr_err("direct_return: %pS: %d\n", (void *)ips[i], ret);
			goto undo;
		}
		attached++;
	}
	pr_info("direct_return: attached to %d functions\n", attached);
	return 0;
undo:
	while (attached--)
		unregister_ftrace_direct(ips[attached], (unsigned long)direct_return_tramp);
	return ret;
}

static void __exit direct_return_exit(void)
{
	while (attached--)
		unregister_ftrace_direct(ips[attached], (unsigned long)direct_return_tramp);
}

module_init(direct_return_init);
module_exit(direct_return_exit);
MODULE_LICENSE("GPL");
