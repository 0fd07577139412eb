/*
 * Guest-side probe: where does a call instruction of running kernel code go?
 *
 * Usage: call-target MODULE FUNCTION OFFSET
 *
 * Finds FUNCTION of MODULE in /proc/kallsyms, reads the 5-byte call (e8) or
 * jump (e9) at FUNCTION+OFFSET through /proc/kcore and prints
 *
 *     call-target: FUNCTION+0xOFF calls SYMBOL [OWNER]
 *
 * naming the kallsyms symbol at the target address (or "calls 0x..." when
 * none starts there). Exits 1 if anything cannot be read or the bytes are
 * not a call or jump.
 */
#include <elf.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct ksym {
	unsigned long long address;
	char type;
	char name[256];
	char owner[256]; /* empty for vmlinux */
};

/* The next line of /proc/kallsyms in `f`; 0 at its end. */
static int next_ksym(FILE *f, struct ksym *s)
{
	char line[600];

	while (fgets(line, sizeof(line), f)) {
		s->owner[0] = 0;
		if (sscanf(line, "%llx %c %255s [%255[^]]]", &s->address, &s->type, s->name,
			   s->owner) >= 3)
			return 1;
	}
	return 0;
}

static int find_symbol(const char *module, const char *function, uint64_t *address)
{
	FILE *f = fopen("/proc/kallsyms", "r");
	struct ksym s;
	int found = 0;

	if (!f)
		return 0;
	while (!found && next_ksym(f, &s)) {
		if (strcmp(s.name, function) == 0 && strcmp(s.owner, module) == 0) {
			*address = s.address;
			found = 1;
		}
	}
	fclose(f);
	return found;
}

/* The kallsyms symbol starting at `address`, as "NAME [OWNER]". */
static int symbol_at(uint64_t address, char *out, size_t len)
{
	FILE *f = fopen("/proc/kallsyms", "r");
	struct ksym s;
	int found = 0;

	if (!f)
		return 0;
	while (!found && next_ksym(f, &s)) {
		if (s.address == address && (s.type == 't' || s.type == 'T')) {
			snprintf(out, len, "%s [%s]", s.name, s.owner[0] ? s.owner : "vmlinux");
			found = 1;
		}
	}
	fclose(f);
	return found;
}

static int read_kcore(uint64_t address, unsigned char *buf, size_t len)
{
	Elf64_Ehdr eh;
	Elf64_Phdr ph;
	int fd = open("/proc/kcore", O_RDONLY);
	int i, ok = 0;

	if (fd < 0)
		return 0;
	if (pread(fd, &eh, sizeof(eh), 0) != sizeof(eh))
		goto out;
	for (i = 0; i < eh.e_phnum; i++) {
		if (pread(fd, &ph, sizeof(ph), eh.e_phoff + (uint64_t)i * eh.e_phentsize) != sizeof(ph))
			goto out;
		if (ph.p_type != PT_LOAD || address < ph.p_vaddr ||
		    address + len > ph.p_vaddr + ph.p_memsz)
			continue;
		ok = pread(fd, buf, len, ph.p_offset + (address - ph.p_vaddr)) == (ssize_t)len;
		break;
	}
out:
	close(fd);
	return ok;
}

int main(int argc, char **argv)
{
	unsigned char insn[5];
	uint64_t function, site, target;
	unsigned long offset;
	int32_t rel;
	char name[600];

	if (argc != 4) {
		fprintf(stderr, "usage: call-target MODULE FUNCTION OFFSET\n");
		return 2;
	}
	offset = strtoul(argv[3], NULL, 0);
	if (!find_symbol(argv[1], argv[2], &function)) {
		printf("call-target: no %s in [%s]\n", argv[2], argv[1]);
		return 1;
	}
	site = function + offset;
	if (!read_kcore(site, insn, sizeof(insn))) {
		printf("call-target: cannot read %#" PRIx64 " through /proc/kcore\n", site);
		return 1;
	}
	if (insn[0] != 0xe8 && insn[0] != 0xe9) {
		printf("call-target: %s+%#lx is not a call (%02x)\n", argv[2], offset, insn[0]);
		return 1;
	}
	memcpy(&rel, insn + 1, sizeof(rel));
	target = site + sizeof(insn) + (int64_t)rel;
	if (symbol_at(target, name, sizeof(name)))
		printf("call-target: %s+%#lx calls %s\n", argv[2], offset, name);
	else
		printf("call-target: %s+%#lx calls %#" PRIx64 "\n", argv[2], offset, target);
	return 0;
}
