/*
 * The disk workload (ferry.run=disk), on the BSP, in ring 3.
 *
 * disk_setup() runs before `ready`: it sets up the first virtio-blk device
 * (virtio_blk.c), reads its serial (GET_ID), prints `disk found`, and checks
 * that a read past the end fails (`disk beyond-end`) and, on a read-only
 * device, that a write fails (`disk ro-write`). From then on disk_poll(),
 * called from the BSP's poll(), advances a state machine one request at a
 * time, so the disk runs beside tick and sweep and a request is nearly
 * always in flight:
 *
 *   read-write: generations g = 1, 2, ... For each block b: (g > 1) read b
 *     and check it holds generation g-1; write generation g; read it back
 *     and check. After every 64 blocks and at the end of a pass: FLUSH
 *     (when offered), then `disk gen=G done=B irqs=I`.
 *   read-only: read every block and check it holds generation 1, forever;
 *     `disk ro verified pass=P` after each pass.
 *
 * A mismatch (`disk mismatch`) or a bad status (`disk error`) stops the
 * workload; the others go on. The line formats are documented with their
 * parser in src/guest/mod.rs.
 */
#include "guest.h"
#include "x86.h"
#include "disk.h"

#define DEFAULT_MAX_BLOCKS 4096 /* 16 MiB */
#define REPORT_BLOCKS 64
#define SECTORS_PER_BLOCK (DISK_BLOCK / SECTOR_SIZE)
#define WORDS (DISK_BLOCK / 8)

/*
 * The block pattern: word i of block b at generation g. Every word names
 * its block, generation and index, so a misplaced, stale or torn block
 * fails the check. The host's copy is ferry::guest::disk::disk_word().
 */
#define PATTERN_MUL 0xd1b54a32d192ed03UL
#define PATTERN_MUL_INV 0x06106ccfa448e5abUL /* PATTERN_MUL * this = 1 mod 2^64 */
#define PATTERN_TAG 5UL

static uint64_t disk_word(uint64_t block, uint64_t gen, uint64_t i)
{
	uint64_t x = (PATTERN_TAG << 61 | i << 52 | (gen & 0xfffff) << 32 | (block & 0xffffffff)) *
		     PATTERN_MUL;

	return x ^ (x >> 32);
}

/* The generation field of a word, whatever its other fields say. */
static uint64_t word_gen(uint64_t w)
{
	return ((w ^ (w >> 32)) * PATTERN_MUL_INV) >> 32 & 0xfffff;
}

volatile uint64_t disk_irqs;

enum step { CHECK_OLD, WRITE, CHECK_NEW, FLUSH, RO_CHECK };

static struct {
	struct vblk dev;
	bool on;   /* the workload runs */
	bool busy; /* a request is in flight */
	enum step step;
	uint64_t blocks; /* blocks in use */
	uint64_t gen;	 /* generation being written (read-only: 1) */
	uint64_t block;	 /* block of the current step; FLUSH: blocks done */
	uint64_t passes; /* read-only: passes verified */
} disk;

static void fill_block(uint64_t block, uint64_t gen)
{
	uint64_t *w = (uint64_t *)disk.dev.data, i;

	for (i = 0; i < WORDS; i++)
		w[i] = disk_word(block, gen, i);
}

static bool verify(uint64_t expect)
{
	const uint64_t *w = (const uint64_t *)disk.dev.data;
	uint64_t i;

	for (i = 0; i < WORDS; i++) {
		if (w[i] != disk_word(disk.block, expect, i)) {
			print("disk mismatch block=%lu gen=%lu expected=%lu found=%lu word=%lu "
			      "value=0x%lx",
			      disk.block, disk.gen, expect, word_gen(w[i]), i, w[i]);
			return false;
		}
	}
	return true;
}

static const char *op_name(enum step s)
{
	return s == WRITE ? "write" : s == FLUSH ? "flush" : "read";
}

/* The serial from GET_ID: up to 20 bytes, NUL-padded; odd bytes become '?'. */
static void serial_string(char *out)
{
	uint32_t i;

	for (i = 0; i < VIRTIO_BLK_ID_BYTES && disk.dev.data[i]; i++)
		out[i] = disk.dev.data[i] > ' ' && disk.dev.data[i] < 0x7f ? (char)disk.dev.data[i]
									     : '?';
	out[i] = 0;
}

/* How many blocks to use: ferry.disk_blocks, else the disk capped at 16 MiB. */
static uint64_t blocks_to_use(uint64_t capacity)
{
	uint64_t all = capacity / SECTORS_PER_BLOCK;

	if (!boot.cfg.disk_blocks)
		return min_u64(all, DEFAULT_MAX_BLOCKS);
	if (boot.cfg.disk_blocks > all) {
		print("warning: ferry.disk_blocks=%lu but the disk holds %lu blocks; using %lu",
		      boot.cfg.disk_blocks, all, all);
		return all;
	}
	return boot.cfg.disk_blocks;
}

void disk_setup(uint64_t mem)
{
	struct vblk *d = &disk.dev;
	char serial[VIRTIO_BLK_ID_BYTES + 1];
	bool ro;
	uint8_t st;

	if (!mem) {
		print("warning: disk: no free RAM for the driver; the disk workload is off");
		return;
	}
	if (!vblk_init(d, mem, cpus[0].apic_id))
		return;
	ro = (d->features >> VIRTIO_BLK_F_RO) & 1;

	memset(d->data, 0, VIRTIO_BLK_ID_BYTES);
	if (!vblk_run(d, VIRTIO_BLK_T_GET_ID, 0, VIRTIO_BLK_ID_BYTES, &st))
		return;
	if (st != VIRTIO_BLK_S_OK) {
		print("disk error op=get-id block=0 status=%u", st);
		return;
	}
	serial_string(serial);
	disk.blocks = blocks_to_use(d->capacity);
	print("disk found addr=%c%c.%u capacity=%lu blk_size=%u ro=%u blocks=%lu serial=%s",
	      "0123456789abcdef"[d->slot >> 4], "0123456789abcdef"[d->slot & 15], d->function,
	      d->capacity, d->blk_size, ro, disk.blocks, serial);

	if (!vblk_run(d, VIRTIO_BLK_T_IN, d->capacity, DISK_BLOCK, &st))
		return;
	print("disk beyond-end status=%u", st);
	if (ro) {
		/* What block 0 should hold anyway, should the write go through. */
		fill_block(0, 1);
		if (!vblk_run(d, VIRTIO_BLK_T_OUT, 0, DISK_BLOCK, &st))
			return;
		print("disk ro-write status=%u", st);
	}
	if (!disk.blocks) {
		print("warning: disk: the disk is smaller than one 4 KiB block; the disk "
		      "workload is off");
		return;
	}
	disk.gen = 1;
	disk.step = ro ? RO_CHECK : WRITE;
	disk.on = true;
}

/* The pass's first step for each block. */
static enum step first_step(void)
{
	return disk.gen > 1 ? CHECK_OLD : WRITE;
}

/* Blocks [0, block) hold gen, and are on the disk (flushed). */
static void report(void)
{
	print("disk gen=%lu done=%lu irqs=%lu", disk.gen, disk.block, disk_irqs);
	if (disk.block == disk.blocks) {
		disk.gen++;
		disk.block = 0;
	}
	disk.step = first_step();
}

/* The request for disk.step finished with OK: check it, pick the next step. */
static bool advance(void)
{
	switch (disk.step) {
	case CHECK_OLD:
		if (!verify(disk.gen - 1))
			return false;
		disk.step = WRITE;
		break;
	case WRITE:
		disk.step = CHECK_NEW;
		break;
	case CHECK_NEW:
		if (!verify(disk.gen))
			return false;
		disk.block++;
		if (disk.block % REPORT_BLOCKS && disk.block < disk.blocks)
			disk.step = first_step();
		else if (disk.dev.features & 1UL << VIRTIO_BLK_F_FLUSH)
			disk.step = FLUSH;
		else
			report();
		break;
	case FLUSH:
		report();
		break;
	case RO_CHECK:
		if (!verify(1))
			return false;
		if (++disk.block == disk.blocks) {
			disk.block = 0;
			print("disk ro verified pass=%lu", ++disk.passes);
		}
		break;
	}
	return true;
}

static void submit(void)
{
	struct vblk *d = &disk.dev;
	uint64_t sector = disk.block * SECTORS_PER_BLOCK;

	if (disk.step == WRITE) {
		fill_block(disk.block, disk.gen);
		vblk_submit(d, VIRTIO_BLK_T_OUT, sector, DISK_BLOCK);
	} else if (disk.step == FLUSH) {
		vblk_submit(d, VIRTIO_BLK_T_FLUSH, 0, 0);
	} else {
		/* Zeros are no pattern word: a read that delivers nothing fails. */
		memset(d->data, 0, DISK_BLOCK);
		vblk_submit(d, VIRTIO_BLK_T_IN, sector, DISK_BLOCK);
	}
	disk.busy = true;
}

/* From the BSP's poll(): finish the request in flight, if it is done, and start the next. */
void disk_poll(void)
{
	uint8_t st;

	if (!disk.on)
		return;
	if (disk.busy) {
		if (!vblk_done(&disk.dev, &st))
			return;
		disk.busy = false;
		if (st != VIRTIO_BLK_S_OK) {
			print("disk error op=%s block=%lu status=%u", op_name(disk.step), disk.block,
			      st);
			disk.on = false;
			return;
		}
		if (!advance()) {
			disk.on = false;
			return;
		}
	}
	submit();
}
