// Reuse of XLA:CPU's large host blocks.
//
// XLA:CPU allocates the temporaries of each run of a compiled program as one block (hundreds of
// MB for a train step) and frees it when the run ends. glibc maps a block that large afresh
// every time (anything above its largest mmap threshold, 32 MB) and the kernel faults in and
// zeroes each of its pages at every run: for a 2D bf16 train step, 125,000 page faults and a
// fifth of a second of system time per step on 2 cores.
//
// `cc_blocks_install` points the imports of posix_memalign and free of the libraries whose path
// contains a given string (jaxlib's) at the two functions below, by rewriting their entries in
// those libraries' global offset tables. Blocks of at least `min_bytes` go through a small cache:
// a freed one stays mapped and the next request of the same size and alignment gets it back.
// An idle block goes back to the allocator when it was not reused within STALE frees of cached
// blocks, or when the idle blocks exceed `max_idle_bytes` in all (least recently freed first).
// Everything smaller goes straight to the allocator, and so does everything of any other
// library. Both functions forward to whatever posix_memalign and free the process
// resolves (glibc's, or a preloaded allocator's).
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__x86_64__)
#define R_SLOT R_X86_64_JUMP_SLOT
#define R_GLOB R_X86_64_GLOB_DAT
#define R_ABS R_X86_64_64
#elif defined(__aarch64__)
#define R_SLOT R_AARCH64_JUMP_SLOT
#define R_GLOB R_AARCH64_GLOB_DAT
#define R_ABS R_AARCH64_ABS64
#endif

#define SLOTS 32
#define STALE 16  // an idle block not reused within this many frees of cached blocks is released

typedef struct {
  void* p;
  size_t size;
  uint64_t last_free;  // clock at the last free (for eviction), when idle
  int in_use;
} Block;

static int (*real_memalign)(void**, size_t, size_t);
static void (*real_free)(void*);
static size_t (*usable_size)(void*);
static size_t min_bytes = SIZE_MAX, max_idle;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static Block blocks[SLOTS];
static atomic_int tracked;  // non-empty slots
static size_t idle_bytes;
static uint64_t clock_, hits, misses;

static int cache_memalign(void** out, size_t align, size_t size) {
  if (size < min_bytes) return real_memalign(out, align, size);
  pthread_mutex_lock(&mu);
  for (int i = 0; i < SLOTS; i++) {
    Block* b = &blocks[i];
    if (b->p && !b->in_use && b->size == size && (uintptr_t)b->p % align == 0) {
      b->in_use = 1;
      idle_bytes -= size;
      hits++;
      *out = b->p;
      pthread_mutex_unlock(&mu);
      return 0;
    }
  }
  misses++;
  pthread_mutex_unlock(&mu);
  int err = real_memalign(out, align, size);
  if (err) return err;
  pthread_mutex_lock(&mu);
  Block* slot = NULL;
  for (int i = 0; i < SLOTS; i++) {
    // A block freed behind the cache's back (not through the hook) may come back at the same
    // address: forget the old record.
    if (blocks[i].p == *out) {
      blocks[i].p = NULL;
      atomic_fetch_sub(&tracked, 1);
    }
    if (!blocks[i].p && !slot) slot = &blocks[i];
  }
  if (slot) {  // no free slot: the block is not tracked and its free goes to the allocator
    *slot = (Block){*out, size, 0, 1};
    atomic_fetch_add(&tracked, 1);
  }
  pthread_mutex_unlock(&mu);
  return 0;
}

static void cache_free(void* p) {
  if (!p || atomic_load(&tracked) == 0) {
    real_free(p);
    return;
  }
  void* release[SLOTS];
  int n = 0;
  pthread_mutex_lock(&mu);
  Block* b = NULL;
  for (int i = 0; i < SLOTS && !b; i++)
    if (blocks[i].p == p && blocks[i].in_use) b = &blocks[i];
  if (!b) {
    pthread_mutex_unlock(&mu);
    real_free(p);
    return;
  }
  if (usable_size && usable_size(p) < b->size) {  // not the block recorded: forget it
    b->p = NULL;
    atomic_fetch_sub(&tracked, 1);
    pthread_mutex_unlock(&mu);
    real_free(p);
    return;
  }
  b->in_use = 0;
  b->last_free = ++clock_;
  idle_bytes += b->size;
  for (;;) {  // release the least recently freed idle block while too much or too old is idle
    Block* old = NULL;
    for (int i = 0; i < SLOTS; i++)
      if (blocks[i].p && !blocks[i].in_use && (!old || blocks[i].last_free < old->last_free))
        old = &blocks[i];
    if (!old || (idle_bytes <= max_idle && old->last_free + STALE >= clock_)) break;
    release[n++] = old->p;
    idle_bytes -= old->size;
    old->p = NULL;
    atomic_fetch_sub(&tracked, 1);
  }
  pthread_mutex_unlock(&mu);
  for (int i = 0; i < n; i++) real_free(release[i]);
}

// Writes `value` at `where`, a word of a loaded library, whatever the page's protection
// (read-only after relocation for RELRO). Returns 0 on success.
static int write_word(void** where, void* value, const ElfW(Addr) relro[2]) {
  long page = sysconf(_SC_PAGESIZE);
  uintptr_t lo = (uintptr_t)where & ~(uintptr_t)(page - 1);
  size_t len = (uintptr_t)(where + 1) - lo;
  if (mprotect((void*)lo, len, PROT_READ | PROT_WRITE)) return -1;
  *where = value;
  int in_relro = (uintptr_t)where >= relro[0] && (uintptr_t)where < relro[1];
  if (in_relro) mprotect((void*)lo, len, PROT_READ);
  return 0;
}

// A non-PIE executable that takes the address of one of the two functions (Debian's and
// Ubuntu's python3 do, for free) makes a stub in its own PLT the function's address for the whole
// process: dlsym returns the stub, while the libraries' call slots hold the function itself (libc's,
// or a preloaded allocator's). Both are the same function: where the process's lies in the main
// program, `alias` holds the definition the stub leads to, the first among the other loaded
// objects in load order (the order in which the dynamic linker resolves symbols).
static void* alias[2];  // posix_memalign, free

#define OBJECTS 1024

typedef struct {
  int n;
  const char* name[OBJECTS];
  uintptr_t lo[OBJECTS], hi[OBJECTS];  // the span of the object's loaded segments
} Objects;

static int list_object(struct dl_phdr_info* info, size_t size, void* data) {
  (void)size;
  Objects* o = data;
  if (o->n == OBJECTS) return 1;
  uintptr_t lo = UINTPTR_MAX, hi = 0;
  for (int i = 0; i < info->dlpi_phnum; i++) {
    const ElfW(Phdr)* ph = &info->dlpi_phdr[i];
    if (ph->p_type != PT_LOAD) continue;
    uintptr_t a = info->dlpi_addr + ph->p_vaddr;
    if (a < lo) lo = a;
    if (a + ph->p_memsz > hi) hi = a + ph->p_memsz;
  }
  o->name[o->n] = info->dlpi_name;
  o->lo[o->n] = lo;
  o->hi[o->n++] = hi;
  return 0;
}

static void find_aliases(void) {
  static Objects o;  // in load order, the main program first
  o.n = 0;
  dl_iterate_phdr(list_object, &o);
  if (o.n == 0) return;
  const char* names[2] = {"posix_memalign", "free"};
  void* process[2] = {(void*)real_memalign, (void*)real_free};
  for (int i = 0; i < 2; i++) {
    if ((uintptr_t)process[i] < o.lo[0] || (uintptr_t)process[i] >= o.hi[0]) continue;
    for (int j = 1; j < o.n && !alias[i]; j++) {
      if (!o.name[j] || !o.name[j][0]) continue;
      void* h = dlopen(o.name[j], RTLD_LAZY | RTLD_NOLOAD);
      if (!h) continue;
      void* f = dlsym(h, names[i]);  // may come from one of the object's dependencies
      if ((uintptr_t)f >= o.lo[j] && (uintptr_t)f < o.hi[j]) alias[i] = f;
      dlclose(h);
    }
  }
}

typedef struct {
  const char* path_part;
  int patched, failed;
} Search;

static uintptr_t dyn_addr(ElfW(Addr) base, ElfW(Addr) value) {
  // glibc stores relocated addresses in the dynamic section, other loaders the link-time ones.
  return value < base ? base + value : value;
}

static int patch_library(struct dl_phdr_info* info, size_t size, void* data) {
  (void)size;
  Search* s = data;
  if (!info->dlpi_name || !strstr(info->dlpi_name, s->path_part)) return 0;
  ElfW(Addr) base = info->dlpi_addr, relro[2] = {0, 0}, end = base;
  const ElfW(Dyn)* dyn = NULL;
  for (int i = 0; i < info->dlpi_phnum; i++) {
    const ElfW(Phdr)* ph = &info->dlpi_phdr[i];
    if (ph->p_type == PT_DYNAMIC) dyn = (const ElfW(Dyn)*)(base + ph->p_vaddr);
    if (ph->p_type == PT_LOAD && base + ph->p_vaddr + ph->p_memsz > end)
      end = base + ph->p_vaddr + ph->p_memsz;
    if (ph->p_type == PT_GNU_RELRO) {
      relro[0] = base + ph->p_vaddr;
      relro[1] = relro[0] + ph->p_memsz;
    }
  }
  if (!dyn) return 0;
  const ElfW(Sym)* symtab = NULL;
  const char* strtab = NULL;
  const ElfW(Rela)* tables[2] = {NULL, NULL};
  size_t sizes[2] = {0, 0};
  for (; dyn->d_tag != DT_NULL; dyn++) {
    switch (dyn->d_tag) {
      case DT_SYMTAB: symtab = (const ElfW(Sym)*)dyn_addr(base, dyn->d_un.d_ptr); break;
      case DT_STRTAB: strtab = (const char*)dyn_addr(base, dyn->d_un.d_ptr); break;
      case DT_RELA: tables[0] = (const ElfW(Rela)*)dyn_addr(base, dyn->d_un.d_ptr); break;
      case DT_RELASZ: sizes[0] = dyn->d_un.d_val; break;
      case DT_JMPREL: tables[1] = (const ElfW(Rela)*)dyn_addr(base, dyn->d_un.d_ptr); break;
      case DT_PLTRELSZ: sizes[1] = dyn->d_un.d_val; break;
      case DT_PLTREL: if (dyn->d_un.d_val != DT_RELA) return 0; break;
    }
  }
  if (!symtab || !strtab) return 0;
  for (int t = 0; t < 2; t++) {
    if (!tables[t]) continue;
    for (size_t i = 0; i < sizes[t] / sizeof(ElfW(Rela)); i++) {
      const ElfW(Rela)* r = &tables[t][i];
      unsigned type = ELF64_R_TYPE(r->r_info);
      if (type != R_SLOT && type != R_GLOB && (type != R_ABS || r->r_addend != 0)) continue;
      const char* name = strtab + symtab[ELF64_R_SYM(r->r_info)].st_name;
      void* hook = !strcmp(name, "posix_memalign") ? (void*)cache_memalign
                   : !strcmp(name, "free")         ? (void*)cache_free
                                                   : NULL;
      if (!hook) continue;
      void** where = (void**)(base + r->r_offset);
      // Bound slots hold the process's function; a lazy slot still points into the library's
      // PLT. Anything else was rewritten by someone else: leave it.
      int k = hook == (void*)cache_free;
      void* real = k ? (void*)real_free : (void*)real_memalign;
      int lazy = type == R_SLOT && (uintptr_t)*where >= base && (uintptr_t)*where < end;
      if (*where != real && !(alias[k] && *where == alias[k]) && !lazy) {
        s->failed++;
        continue;
      }
      if (write_word(where, hook, relro)) s->failed++;
      else s->patched++;
    }
  }
  return 0;
}

// Installs the cache in the loaded libraries whose path contains `path_part`. Returns the
// number of entries rewritten (0: nothing found, or it could not be done); -1 if some could
// not be rewritten (the ones that were stay rewritten: both functions handle blocks from the
// other path).
int cc_blocks_install(const char* path_part, size_t min_block_bytes, size_t max_idle_bytes) {
#if !defined(R_SLOT)
  return 0;
#else
  static int installed;
  if (installed) return installed;
  real_memalign = (int (*)(void**, size_t, size_t))dlsym(RTLD_DEFAULT, "posix_memalign");
  real_free = (void (*)(void*))dlsym(RTLD_DEFAULT, "free");
  usable_size = (size_t(*)(void*))dlsym(RTLD_DEFAULT, "malloc_usable_size");
  if (!real_memalign || !real_free) return 0;
  min_bytes = min_block_bytes;
  max_idle = max_idle_bytes;
  find_aliases();
  Search s = {path_part, 0, 0};
  dl_iterate_phdr(patch_library, &s);
  installed = s.failed ? -1 : s.patched;
  return installed;
#endif
}

// hits, misses (requests of at least min_bytes), idle bytes, tracked blocks.
void cc_blocks_stats(uint64_t out[4]) {
  pthread_mutex_lock(&mu);
  out[0] = hits;
  out[1] = misses;
  out[2] = idle_bytes;
  out[3] = (uint64_t)atomic_load(&tracked);
  pthread_mutex_unlock(&mu);
}

// Returns the idle blocks to the allocator.
void cc_blocks_release(void) {
  void* release[SLOTS];
  int n = 0;
  pthread_mutex_lock(&mu);
  for (int i = 0; i < SLOTS; i++) {
    if (blocks[i].p && !blocks[i].in_use) {
      release[n++] = blocks[i].p;
      idle_bytes -= blocks[i].size;
      blocks[i].p = NULL;
      atomic_fetch_sub(&tracked, 1);
    }
  }
  pthread_mutex_unlock(&mu);
  for (int i = 0; i < n; i++) real_free(release[i]);
}
