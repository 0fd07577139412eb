/*
 * Guest-side reader of the running kernel's code, for checks that look at
 * what the kernel did to its text at boot (sealed ENDBRs) instead of
 * waiting for a fault.
 *
 * Usage: kcore-bytes ADDRESS COUNT
 *
 * Prints COUNT bytes of kernel memory at ADDRESS (hex, as /proc/kallsyms
 * shows it) as space-separated hex, read from /proc/kcore through the
 * program header that maps the address. Exits 1 when it cannot.
 */
#include <elf.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: kcore-bytes ADDRESS COUNT\n");
		return 1;
	}
	unsigned long long address = strtoull(argv[1], NULL, 16);
	int count = atoi(argv[2]);
	int fd = open("/proc/kcore", O_RDONLY);
	Elf64_Ehdr header;
	if (fd < 0 || pread(fd, &header, sizeof(header), 0) != sizeof(header)) {
		perror("kcore-bytes: /proc/kcore");
		return 1;
	}
	for (int i = 0; i < header.e_phnum; i++) {
		Elf64_Phdr segment;
		off_t at = header.e_phoff + (off_t)i * header.e_phentsize;
		if (pread(fd, &segment, sizeof(segment), at) != sizeof(segment))
			break;
		if (segment.p_type != PT_LOAD || address < segment.p_vaddr ||
		    address + count > segment.p_vaddr + segment.p_memsz)
			continue;
		unsigned char bytes[64];
		if (count < 1 || count > (int)sizeof(bytes) ||
		    pread(fd, bytes, count, segment.p_offset + (address - segment.p_vaddr)) != count) {
			fprintf(stderr, "kcore-bytes: cannot read %d bytes at %llx\n", count, address);
			return 1;
		}
		for (int j = 0; j < count; j++)
			printf("%02x%s", bytes[j], j + 1 < count ? " " : "\n");
		return 0;
	}
	fprintf(stderr, "kcore-bytes: %llx is not mapped in /proc/kcore\n", address);
	return 1;
}
