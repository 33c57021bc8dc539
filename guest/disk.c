/*
 * The disk workload (ferry.run=disk), on the BSP, in ring 3.
 *
 * disk_setup() runs before `ready`: it sets up the first virtio-blk device
 * (virtio_blk.c), reads its serial (GET_ID), prints `disk found`, and checks
 * that a read past the end fails (`disk beyond-end`) and, on a read-only
 * device, that a write fails (`disk ro-write`). From then on disk_poll(),
 * called from the BSP's poll(), takes the completions the used ring
 * reports, in whatever order they come, and starts the next requests, so
 * the disk runs beside tick and sweep with up to BLOCK_SLOTS blocks (and a
 * flush) in flight:
 *
 *   read-write: generations g = 1, 2, ... Each block slot takes the next
 *     block b and runs it through: (g > 1) read b and check it holds
 *     generation g-1; write generation g; read it back and check. When the
 *     blocks below the next multiple of 64 (or all of them) are verified,
 *     the flush slot issues a FLUSH (when offered), and when it ends prints
 *     `disk gen=G done=B irqs=I inflight=K`. The block slots go on
 *     meanwhile, but never start a block at or past the last line's done +
 *     AHEAD_BLOCKS, and the next pass starts after the last line of this one.
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

/*
 * Slots 0 .. BLOCK_SLOTS-1 each carry one block through its steps; slot
 * FLUSH_SLOT only flushes. While a flush runs the block slots may go on
 * through the next REPORT_BLOCKS blocks: with less room they would sit idle
 * until the flush ends (QEMU's flush is an fdatasync). The host's copy of
 * AHEAD_BLOCKS is ferry::guest::disk::DISK_AHEAD_BLOCKS.
 */
#define BLOCK_SLOTS 8
#define FLUSH_SLOT BLOCK_SLOTS
#define AHEAD_BLOCKS (2 * REPORT_BLOCKS)
_Static_assert(BLOCK_SLOTS + 1 <= VBLK_SLOTS, "a driver slot for every block slot and flushes");
_Static_assert(DMEM_PAGES * PAGE_SIZE == DISK_MEM_BYTES, "guest.h reserves the driver's RAM");

enum step { CHECK_OLD, WRITE, CHECK_NEW, FLUSH, RO_CHECK };

struct slot {
	bool busy;
	enum step step;
	uint64_t block; /* FLUSH: the blocks done it makes durable */
};

static struct {
	struct vblk dev;
	bool on;	 /* the workload runs */
	bool ro;
	bool started;	 /* the first requests went out */
	uint64_t blocks; /* blocks in use */
	uint64_t gen;	 /* generation being written (read-only: 1) */
	uint64_t next;	 /* the next block to start in this pass */
	uint64_t done;	 /* read-write: done= of the last line of this pass (0 before it) */
	uint64_t checked; /* read-only: blocks verified in this pass */
	uint64_t passes;  /* read-only: passes verified */
	struct slot slots[BLOCK_SLOTS + 1];
} disk;

static void fill_block(uint32_t slot, uint64_t block, uint64_t gen)
{
	uint64_t *w = (uint64_t *)vblk_data(&disk.dev, slot), i;

	for (i = 0; i < WORDS; i++)
		w[i] = disk_word(block, gen, i);
}

static bool verify(uint32_t slot, uint64_t expect)
{
	const uint64_t *w = (const uint64_t *)vblk_data(&disk.dev, slot);
	uint64_t i, block = disk.slots[slot].block;

	for (i = 0; i < WORDS; i++) {
		if (w[i] != disk_word(block, expect, i)) {
			print("disk mismatch block=%lu gen=%lu expected=%lu found=%lu word=%lu "
			      "value=0x%lx",
			      block, disk.gen, expect, word_gen(w[i]), i, w[i]);
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
	const uint8_t *id = vblk_data(&disk.dev, 0);
	uint32_t i;

	for (i = 0; i < VIRTIO_BLK_ID_BYTES && id[i]; i++)
		out[i] = id[i] > ' ' && id[i] < 0x7f ? (char)id[i] : '?';
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
	uint8_t st;

	if (!mem) {
		print("warning: disk: no free RAM for the driver; the disk workload is off");
		return;
	}
	if (!vblk_init(d, mem, cpus[0].apic_id))
		return;
	disk.ro = (d->features >> VIRTIO_BLK_F_RO) & 1;

	memset(vblk_data(d, 0), 0, VIRTIO_BLK_ID_BYTES);
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
	      d->capacity, d->blk_size, disk.ro, disk.blocks, serial);

	if (!vblk_run(d, VIRTIO_BLK_T_IN, d->capacity, DISK_BLOCK, &st))
		return;
	print("disk beyond-end status=%u", st);
	if (disk.ro) {
		/* What block 0 should hold anyway, should the write go through. */
		fill_block(0, 0, 1);
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
	disk.on = true;
}

static void submit(uint32_t slot, enum step step)
{
	struct vblk *d = &disk.dev;
	struct slot *s = &disk.slots[slot];
	uint64_t sector = s->block * SECTORS_PER_BLOCK;

	s->step = step;
	s->busy = true;
	if (step == WRITE) {
		fill_block(slot, s->block, disk.gen);
		vblk_submit(d, slot, VIRTIO_BLK_T_OUT, sector, DISK_BLOCK);
	} else if (step == FLUSH) {
		vblk_submit(d, slot, VIRTIO_BLK_T_FLUSH, 0, 0);
	} else {
		/* Zeros are no pattern word: a read that delivers nothing fails. */
		memset(vblk_data(d, slot), 0, DISK_BLOCK);
		vblk_submit(d, slot, VIRTIO_BLK_T_IN, sector, DISK_BLOCK);
	}
}

/* Where the next line's done= will be. */
static uint64_t next_report(void)
{
	return min_u64(disk.done + REPORT_BLOCKS, disk.blocks);
}

/* Blocks [0, result) of this pass are written, read back and verified. */
static uint64_t verified(void)
{
	uint64_t low = disk.next;
	uint32_t i;

	for (i = 0; i < BLOCK_SLOTS; i++)
		if (disk.slots[i].busy && disk.slots[i].block < low)
			low = disk.slots[i].block;
	return low;
}

/*
 * Blocks [0, block) hold gen and are on the disk (flushed); the requests in
 * flight are all on later blocks.
 */
static void report(uint64_t block)
{
	print("disk gen=%lu done=%lu irqs=%lu inflight=%u", disk.gen, block, disk_irqs,
	      disk.dev.inflight);
	disk.done = block;
	if (block == disk.blocks) {
		disk.gen++;
		disk.done = disk.next = 0;
	}
}

/* Slot `slot`'s request ended with OK: check it and take its block's next step. */
static bool advance(uint32_t slot)
{
	struct slot *s = &disk.slots[slot];

	s->busy = false;
	switch (s->step) {
	case CHECK_OLD:
		if (!verify(slot, disk.gen - 1))
			return false;
		submit(slot, WRITE);
		break;
	case WRITE:
		submit(slot, CHECK_NEW);
		break;
	case CHECK_NEW:
		if (!verify(slot, disk.gen))
			return false;
		break;
	case FLUSH:
		report(s->block);
		break;
	case RO_CHECK:
		if (!verify(slot, 1))
			return false;
		if (++disk.checked == disk.blocks) {
			disk.checked = disk.next = 0;
			print("disk ro verified pass=%lu", ++disk.passes);
		}
		break;
	}
	return true;
}

/* Give idle slots their next request, and flush (and report) when a line is due. */
static void refill(void)
{
	uint32_t i;

	if (!disk.ro) {
		while (!disk.slots[FLUSH_SLOT].busy && verified() >= next_report()) {
			if (!(disk.dev.features & 1UL << VIRTIO_BLK_F_FLUSH)) {
				report(next_report());
				continue;
			}
			disk.slots[FLUSH_SLOT].block = next_report();
			submit(FLUSH_SLOT, FLUSH);
		}
	}
	for (i = 0; i < BLOCK_SLOTS && disk.next < disk.blocks; i++) {
		if (disk.slots[i].busy)
			continue;
		if (disk.ro) {
			/* The pass ends when every block is checked, not when the last starts. */
			disk.slots[i].block = disk.next++;
			submit(i, RO_CHECK);
		} else if (disk.next < disk.done + AHEAD_BLOCKS) {
			disk.slots[i].block = disk.next++;
			submit(i, disk.gen > 1 ? CHECK_OLD : WRITE);
		}
	}
}

/*
 * From the BSP's poll(): take every completion the used ring reports, start
 * what they allow, and notify the device once if it wants to hear.
 */
void disk_poll(void)
{
	struct slot *s;
	uint8_t st;
	int slot;
	bool any = !disk.started;

	if (!disk.on)
		return;
	while ((slot = vblk_reap(&disk.dev, &st)) >= 0) {
		any = true;
		s = &disk.slots[slot];
		if (st != VIRTIO_BLK_S_OK) {
			print("disk error op=%s block=%lu status=%u", op_name(s->step), s->block, st);
			disk.on = false;
			return;
		}
		if (!advance((uint32_t)slot)) {
			disk.on = false;
			return;
		}
	}
	if (slot == -2) {
		disk.on = false;
		return;
	}
	if (!any)
		return;
	disk.started = true;
	refill();
	vblk_kick(&disk.dev);
}
